"""prefork.Dispatcher: the seed's behaviour point by point, and beyond."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

import pytest

from prefork import Dispatcher, XMLRPCFront
from prefork.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


class Results:
    """Collects (request, response) pairs from callbacks running in the supervisor thread."""

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], Any]] = []
        self.cond = threading.Condition()

    def __call__(self, request: dict[str, Any], response: Any) -> None:
        with self.cond:
            self.items.append((request, response))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10) -> list[tuple[dict[str, Any], Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), f"{len(self.items)} of {n} results"
            return list(self.items)


def add(sender: Any, a: int, b: int) -> dict[str, Any]:
    return {"sum": a + b, "from": sender, "pid": os.getpid()}


def sleepy(sender: Any, seconds: float, n: int = 0) -> int:
    time.sleep(seconds)
    return os.getpid()


def explode(sender: Any) -> None:
    raise KeyError("nope")


class MathClass:
    @staticmethod
    def mul(sender: Any, a: int, b: int) -> int:
        return a * b

    @staticmethod
    def add(sender: Any, a: int, b: int) -> str:
        return "MathClass.add"


class OtherClass:
    @staticmethod
    def mul(sender: Any, a: int, b: int) -> str:
        return "shadowed"

    @staticmethod
    def only_here(sender: Any) -> str:
        return "OtherClass.only_here"


class Special:
    """The seed's special methods, recording where and with what they run."""

    @staticmethod
    def _note(what: str, *args: Any) -> None:
        with open(os.environ["SPECIAL_LOG"], "a") as f:
            f.write(f"{what} {os.getpid()} {list(args)}\n")

    @staticmethod
    def _precall(sender: Any, *params: Any) -> None:
        Special._note("precall", *params)

    @staticmethod
    def _postcall(sender: Any, *params: Any) -> None:
        Special._note("postcall", *params)

    @staticmethod
    def _fork_preinit() -> None:
        Special._note("fork_preinit")

    @staticmethod
    def _fork_postinit() -> None:
        Special._note("fork_postinit")

    @staticmethod
    def _fork_init() -> None:
        Special._note("fork_init")

    @staticmethod
    def work(sender: Any, x: int) -> int:
        return x + 1


def test_the_seed_synopsis_runs() -> None:
    out = subprocess.run([sys.executable, "examples/dispatcher.py", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == [f"Enqueued request {n}" for n in range(1, 6)]
    assert sorted(line.split()[3] for line in lines if line.startswith("Task with param")) == ["1", "2", "3", "4", "5"]
    assert out.stderr.count("Task running with 'a value'") == 5


def test_fifo_results_with_elapsed_and_from() -> None:
    results = Results()
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, pre_fork=1) as d:
        for i in range(5):
            d.new_request({"method_name": "add", "params": [i, 10], "from": f"client{i}"})
        got = results.wait(5)
    assert [resp["sum"] for _, resp in got] == [10, 11, 12, 13, 14]  # one worker: FIFO order
    assert [resp["from"] for _, resp in got] == [f"client{i}" for i in range(5)]
    assert all(req["elapsed"] >= 0 for req, _ in got)
    assert got[0][0]["params"] == [0, 10]  # the request handed back is the one passed


def test_elapsed_measures_the_call() -> None:
    results = Results()
    with Dispatcher(methods={"sleepy": sleepy}, upon_result=results, max_forks=1, pre_fork=1) as d:
        d.new_request({"method_name": "sleepy", "params": [0.3]})
        (request, _), = results.wait(1)
    assert 0.25 <= request["elapsed"] < 5


def test_lookup_order_request_method_then_map_then_classes() -> None:
    results = Results()
    with Dispatcher(methods={"add": add}, classes=[MathClass, OtherClass], upon_result=results, max_forks=1) as d:
        d.new_request({"method": MathClass.add, "method_name": "add", "params": [1, 2]})  # own method first
        d.new_request({"method_name": "add", "params": [1, 2]})  # the map before classes
        d.new_request({"method_name": "mul", "params": [3, 4]})  # first class that has it
        d.new_request({"method_name": "only_here", "params": []})  # later class
        d.new_request({"method_name": "missing", "params": []})  # nobody: an error result
        d.new_request({"method_name": "_precall", "params": []})  # private names are never dispatched
        got = [resp for _, resp in results.wait(6)]
    assert got[0] == "MathClass.add"
    assert got[1]["sum"] == 3
    assert got[2] == 12
    assert got[3] == "OtherClass.only_here"
    assert got[4] == {"error": "no method named 'missing' (resolver 'chain')"}
    assert "no method named '_precall'" in got[5]["error"]


def test_errors_come_as_error_dicts_and_the_worker_stays() -> None:
    results = Results()
    with Dispatcher(methods={"explode": explode, "add": add}, upon_result=results, max_forks=1, pre_fork=1) as d:
        d.new_request({"method_name": "explode"})
        d.new_request({"method_name": "add", "params": [1, 1]})
        got = results.wait(2)
        assert len(d.pids()) == 1
    assert got[0][1] == {"error": "KeyError: 'nope'"}
    assert got[1][1]["sum"] == 2


def test_per_request_upon_result_overrides_the_global_one() -> None:
    glob, own = Results(), Results()
    with Dispatcher(methods={"add": add}, upon_result=glob, max_forks=1) as d:
        d.new_request({"method_name": "add", "params": [1, 2], "upon_result": own})
        d.new_request({"method_name": "add", "params": [2, 2]})
        assert own.wait(1)[0][1]["sum"] == 3
        assert glob.wait(1)[0][1]["sum"] == 4
    assert len(own.items) == 1 and len(glob.items) == 1


def test_on_demand_growth_is_spaced_by_the_spawn_delay() -> None:
    results = Results()
    with Dispatcher(methods={"sleepy": sleepy}, upon_result=results, max_forks=4, pre_fork=2, spawn_delay=0.25) as d:
        wait_until(lambda: d.stats()["idle"] == 2, what="the two pre-forked workers")
        t0 = time.monotonic()
        for n in range(5):
            d.new_request({"method_name": "sleepy", "params": [1.5, n]})
        wait_until(lambda: d.stats()["workers"] == 4, timeout=5, what="four workers")
        grown = time.monotonic() - t0
        got = results.wait(5, timeout=20)
        assert d.stats()["spawned_total"] == 4  # never more than max_forks
    assert grown >= 0.45, f"two forks beyond pre_fork must be 0.25 s apart; took {grown:.2f} s"
    assert len({pid for _, pid in got}) == 4


def test_max_requests_recycles_workers() -> None:
    results = Results()
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, pre_fork=1, max_requests=2) as d:
        for i in range(6):
            d.new_request({"method_name": "add", "params": [i, 0]})
        got = results.wait(6)
    pids = [resp["pid"] for _, resp in got]
    assert len(set(pids)) == 3 and pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_special_methods_run_where_the_seed_runs_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIAL_LOG", str(tmp_path / "special.log"))
    results = Results()
    d = Dispatcher(classes=[Special], upon_result=results, max_forks=1, pre_fork=1)
    try:
        d.new_request({"method_name": "work", "params": [41]})
        assert results.wait(1)[0][1] == 42
        worker = d.pids()[0]
        server = d._sup.spawner.pid
    finally:
        d.shutdown()
    lines = [line.split(" ", 2) for line in (tmp_path / "special.log").read_text().splitlines()]
    seen = {what: (int(pid), args) for what, pid, args in lines}
    # the forking parent: the caller itself for the worker forked at start, as in the seed
    assert seen["fork_preinit"][0] == os.getpid() and seen["fork_postinit"][0] == os.getpid()
    assert server != os.getpid()
    assert seen["fork_init"][0] == worker
    assert seen["precall"] == (worker, "[41]") and seen["postcall"] == (worker, "[41]")
    assert [what for what, _, _ in lines].index("precall") < [what for what, _, _ in lines].index("postcall")


def test_talkback_gets_log_lines_at_the_verbose_level() -> None:
    lines: list[str] = []
    results = Results()
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, pre_fork=1, verbose=2, talkback=lines.append, alias="Calc") as d:
        d.new_request({"method_name": "add", "params": [1, 2]})
        results.wait(1)
    text = "\n".join(lines)
    assert "[Calc] dispatcher started" in text
    assert "[Calc] forked worker" in text
    assert "[Calc] request 1 queued: add" in text and "[Calc] request 1 done" in text
    quiet: list[str] = []
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, verbose=0, talkback=quiet.append) as d:
        d.new_request({"method_name": "add", "params": [1, 2]})
        results.wait(2)
    assert quiet == []


def test_talkback_defaults_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    results = Results()
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, verbose=1) as d:
        d.new_request({"method_name": "add", "params": [1, 2]})
        results.wait(1)
    assert "[PreforkDispatch] dispatcher started" in capfd.readouterr().out


def test_fork_name_sets_the_titles() -> None:
    with Dispatcher(methods={"add": add}, max_forks=1, pre_fork=1, fork_name="calcd") as d:
        wait_until(lambda: d.pids(), what="a worker")
        pid = d.pids()[0]
        title = wait_until(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip().decode() == "calcd child" or None,
                           what="the title")
        assert title


def test_no_forks_means_synchronous_handling() -> None:
    results = Results()
    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=0) as d:
        d.new_request({"method_name": "add", "params": [2, 3]})
        ((_, resp),) = results.wait(1)
        assert d.pids() == []
    assert resp["pid"] == os.getpid() and resp["sum"] == 5


def test_a_failing_callback_is_logged_and_the_dispatcher_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    results = Results()

    def bad(request: dict[str, Any], response: Any) -> None:
        raise ValueError("callback bug")

    with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1) as d:
        d.new_request({"method_name": "add", "params": [1, 1], "upon_result": bad})
        d.new_request({"method_name": "add", "params": [2, 2]})
        assert results.wait(1)[0][1]["sum"] == 4
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "callback" in r.getMessage()]
    assert failures and failures[0].exc_info and "callback bug" in str(failures[0].exc_info[1])


def test_callbacks_run_in_the_caller_process() -> None:
    seen: list[int] = []
    done = threading.Event()
    with Dispatcher(methods={"add": add}, max_forks=1) as d:
        d.new_request({"method_name": "add", "params": [1, 1], "upon_result": lambda r, x: (seen.append(os.getpid()), done.set())})
        assert done.wait(10)
    assert seen == [os.getpid()]


def test_asyncio_call_and_coroutine_callbacks() -> None:
    async def scenario() -> tuple[Any, list[Any]]:
        got: list[Any] = []
        finished = asyncio.Event()

        async def on_result(request: dict[str, Any], response: Any) -> None:
            got.append((response["sum"], asyncio.current_task() is not None))
            finished.set()

        with Dispatcher(methods={"add": add}, max_forks=1) as d:
            direct = await d.call("add", 20, 22)
            d.new_request({"method_name": "add", "params": [1, 2], "upon_result": on_result})
            await asyncio.wait_for(finished.wait(), 10)
            missing = await d.call("missing")
        return (direct["sum"], missing), got

    (direct, missing), got = asyncio.run(scenario())
    assert direct == 42 and missing == {"error": "no method named 'missing' (resolver 'chain')"}
    assert got == [(3, True)]


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        ("add", TypeError, "a request is a dict"),
        ({"params": [1]}, ValueError, "needs a 'method' (callable) or a 'method_name'"),
        ({"method_name": "add", "params": "12"}, TypeError, "'params' must be a list"),
        ({"method": "add"}, TypeError, "'method' must be callable"),
        ({"method_name": "add", "upon_result": 3}, TypeError, "'upon_result' must be callable"),
        ({"method_name": "add", "parms": []}, ValueError, "unknown key(s) ['parms']"),
    ],
)
def test_bad_requests_are_refused_clearly(request_: Any, error: type[Exception], text: str) -> None:
    with Dispatcher(methods={"add": add}, max_forks=1) as d, pytest.raises(error) as info:
        d.new_request(request_)
    assert text in str(info.value)


def test_xmlrpc_front_serves_the_pool_over_http() -> None:
    with Dispatcher(methods={"add": add, "explode": explode}, max_forks=2) as d, XMLRPCFront(d) as front:
        proxy = xmlrpc.client.ServerProxy(front.url, allow_none=True)
        assert proxy.add(2, 3)["sum"] == 5
        with pytest.raises(xmlrpc.client.Fault, match="KeyError: 'nope'"):
            proxy.explode()
        with pytest.raises(xmlrpc.client.Fault, match="no method named 'nothing'"):
            proxy.nothing()
        answers: list[int] = []
        callers = [threading.Thread(target=lambda i=i: answers.append(xmlrpc.client.ServerProxy(front.url).add(i, 0)["sum"])) for i in range(8)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(20)
        assert sorted(answers) == list(range(8))


def test_unknown_names_go_to_the_xmlrpc_server_parent() -> None:
    parent = SimpleXMLRPCServer(("127.0.0.1", 0), allow_none=True, logRequests=False)
    parent.register_function(lambda sender, x: f"parent saw {x} from {sender}", "remote_echo")
    thread = threading.Thread(target=parent.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{parent.server_address[1]}/RPC2"
    results = Results()
    try:
        with Dispatcher(methods={"add": add}, upon_result=results, max_forks=1, xmlrpc_server_parent=url) as d:
            d.new_request({"method_name": "add", "params": [1, 2]})
            d.new_request({"method_name": "remote_echo", "params": ["hi"], "from": "me"})
            d.new_request({"method_name": "not_there_either", "params": []})
            got = [resp for _, resp in results.wait(3)]
    finally:
        parent.shutdown()
        parent.server_close()
        thread.join(10)
    assert got[0]["sum"] == 3
    assert got[1] == "parent saw hi from me"
    assert "not_there_either" in got[2]["error"] and "Fault" in got[2]["error"]


def die(sender: Any, code: int) -> None:
    os._exit(code)


def test_a_dying_worker_fails_only_its_request() -> None:
    results = Results()
    with Dispatcher(methods={"die": die, "add": add}, upon_result=results, max_forks=1, pre_fork=1) as d:
        d.new_request({"method_name": "die", "params": [3]})
        d.new_request({"method_name": "add", "params": [1, 1]})
        got = [resp for _, resp in results.wait(2)]
    assert "died while running the task (exit code 3)" in got[0]["error"]
    assert got[1]["sum"] == 2


def test_prefork_run_starts_a_dispatcher_app_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "calc.py").write_text(
        "import threading\n"
        "def add(sender, a, b):\n    return a + b\n"
        "def main(d):\n"
        "    done = threading.Event(); out = []\n"
        "    d.new_request({'method_name': 'add', 'params': [2, 3], 'upon_result': lambda r, x: (out.append(x), done.set())})\n"
        "    done.wait(10)\n"
        "    print('sum', out[0])\n"
    )
    (tmp_path / "prefork.toml").write_text(
        'profile = "dispatcher"\nname = "calcd"\napp = "calc:main"\n'
        '[resolver]\nname = "chain"\nmethods = { add = "calc:add" }\n[scaling]\npre_fork = 1\nmax_forks = 2\n'
    )
    out = subprocess.run([sys.executable, "-m", "prefork", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "sum 5" in out.stdout
