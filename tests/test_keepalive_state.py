"""The scoreboard's KEEPALIVE state: a `prefork serve` child between two requests of a
kept-alive connection accepts no other connection, so it is no spare.  Real servers, real
clients holding real connections: `prefork status` (text and --json), the spare policy,
harakiri, the metrics scrape and the live status page (in headless chromium) see it.

``WorkerHandle.idle(keepalive=True)``, the public API, is tested through the plain
``handle(conn, addr)`` app of docs/profiles/mpm.md that marks its own requests."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork._control_client import fetch_status
from prefork._status import BUCKETS, FAILURE_KINDS, STATUS_VERSION
from prefork.errors import ConfigError
from prefork.metrics import metric_families, serve_metrics
from prefork.testing import descendants, pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # seconds for any one thing to show; generous for a loaded machine
_names = itertools.count()

WSGI_APP = '''
import os

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [environ["PATH_INFO"].encode() + body]
'''

# A plain handle(conn, addr) that marks its own requests: the one docs/profiles/mpm.md shows.
# serve.py marks the connection busy before the call and calls idle() after it.
[LINE_APP] = re.findall(r"<!-- keepalive: app -->\n```python\n(.*?)```", (ROOT / "docs" / "profiles" / "mpm.md").read_text(),
                        re.S)


class Server:
    """`prefork serve` in a subprocess: the WSGI app above, or with ``plain`` the line app."""

    def __init__(self, directory: Path, *settings: str, plain: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "kaapp.py").write_text(LINE_APP if plain else WSGI_APP)
        self.name = f"ka-test-{os.getpid()}-{next(_names)}"
        self.log = directory / "server.log"
        app = ["--set", "app=kaapp:handle"] if plain else ["--wsgi", "kaapp:app"]
        cmd = [sys.executable, "-m", "prefork", "serve", *app, "--set", "mpm.bind=127.0.0.1:0",
               "--set", f'name="{self.name}"', *settings]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=directory, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the server prints it or exits
        if "listening on" not in line:
            self.stop()
            pytest.fail(f"prefork serve did not start: {line!r}\n{self.log.read_text()}")
        self.port = int(line.rsplit(":", 1)[1])
        wait_until(self._answers, WAIT, what="the control socket")

    def _answers(self) -> bool:
        try:
            self.status()
        except ConfigError:  # not listening yet
            return False
        return True

    def status(self) -> dict[str, Any]:
        return fetch_status(self.name)

    def states(self) -> dict[int, str]:
        """Worker pid -> state, as the status says."""
        return {w["pid"]: w["state"] for w in self.status()["workers"] if w["pid"]}

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)

    def stop(self) -> None:
        every = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"prefork serve ignored SIGTERM\n{self.log.read_text()}") from None
        assert code == 0, self.log.read_text()
        wait_until(lambda: not any(pid_alive(p) for p in every), timeout=WAIT, what="the server's children to go")


def get(conn: http.client.HTTPConnection, path: str, close: bool = False) -> int:
    """GET ``path`` (on a kept-alive connection unless ``close``); the pid of the child that answered."""
    conn.request("GET", path, headers={"Connection": "close"} if close else {})
    response = conn.getresponse()
    kept = "close" if close else None
    assert (response.status, response.read(), response.getheader("Connection")) == (200, path.encode(), kept)
    return int(response.getheader("X-Pid") or 0)


def prefork_status(*argv: str) -> str:
    """``prefork status ARGV`` as an operator runs it (its own process)."""
    done = subprocess.run([sys.executable, "-m", "prefork", "status", *argv], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def one_state(srv: Server, pid: int, state: str) -> dict[str, Any]:
    """Wait until ``pid`` is in ``state`` in ``prefork status --json``; that snapshot."""
    def seen() -> dict[str, Any] | None:
        status = json.loads(prefork_status(srv.name, "--json"))
        return status if {w["pid"]: w["state"] for w in status["workers"]}.get(pid) == state else None

    return wait_until(seen, WAIT, what=f"worker {pid} {state} in prefork status --json")


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("keepalive"), "--set", "scaling.name=fixed", "--set", "scaling.workers=2",
                 "--set", "mpm.keepalive_timeout=30")
    # both forked before any test looks (each test checks for processes it left behind)
    wait_until(lambda: list(srv.states().values()) == ["idle", "idle"], WAIT, what="two idle children")
    yield srv
    srv.stop()


@pytest.fixture
def server(shared_server: Server) -> Server:
    """The module's server, once both children are idle (an earlier test's client closed)."""
    wait_until(lambda: list(shared_server.states().values()) == ["idle", "idle"], WAIT, what="two idle children")
    return shared_server


# -- prefork status ------------------------------------------------------------------------------------------


def test_a_child_waiting_on_a_kept_alive_connection_is_keepalive_until_the_client_closes(server: Server) -> None:
    conn = server.http()
    try:
        pid = get(conn, "/first")
        status = one_state(server, pid, "keepalive")
        totals = status["totals"]
        assert (totals["workers"], totals["keepalive"], totals["idle"], totals["busy"]) == (2, 1, 1, 0)
        [entry] = [w for w in status["workers"] if w["pid"] == pid]
        assert (entry["task"], entry["running_for"]) == (None, None)
        text = prefork_status(server.name)
        assert "workers: 2 (0 busy, 1 keepalive, 1 idle, 0 booting)" in text, text
        assert any(line.split()[:2] == [str(pid), "keepalive"] for line in text.splitlines()), text
        assert get(conn, "/second") == pid  # the wait ends with the next request, on the same child
        one_state(server, pid, "keepalive")
    finally:
        conn.close()
    status = one_state(server, pid, "idle")  # the client closed: back to accept
    assert (status["totals"]["keepalive"], status["totals"]["idle"]) == (0, 2)
    text = prefork_status(server.name)
    assert "workers: 2 (0 busy, 2 idle, 0 booting)" in text and "keepalive" not in text, text


def test_a_child_in_a_request_is_busy_and_running_for_counts_from_the_requests_start(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sent = time.monotonic()
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")  # the app waits for the rest
        [entry] = wait_until(lambda: [w for w in server.status()["workers"] if w["state"] == "busy"], WAIT,
                             what="a busy child")
        # the same clock (CLOCK_MONOTONIC) in both processes: the request began after `sent`
        assert 0 <= entry["running_for"] <= time.monotonic() - sent
        assert entry["method"] and entry["task"] is None
        sock.sendall(b"cd")
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert (response.status, response.read()) == (200, b"/slowabcd")
        one_state(server, entry["pid"], "keepalive")


def test_a_keep_alive_wait_longer_than_request_timeout_is_no_stuck_request(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=1",
                 "--set", "mpm.keepalive_timeout=30", "--set", "mpm.request_timeout=0.5")
    try:
        conn = srv.http()
        pid = get(conn, "/a")
        one_state(srv, pid, "keepalive")
        end = time.monotonic() + 2.0  # four times request_timeout; harakiri looks at least every 0.1 s
        while time.monotonic() < end:
            assert srv.states().get(pid) == "keepalive", srv.status()
        assert pid_alive(pid) and get(conn, "/b") == pid
        conn.close()
        assert srv.status()["totals"]["exits"].get("timeout", 0) == 0
    finally:
        srv.stop()


# -- the spare policy -----------------------------------------------------------------------------------------


def test_the_spare_policy_forks_a_child_while_the_only_one_is_kept_alive(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=spare", "--set", "scaling.start_servers=1",
                 "--set", "scaling.min_spare=1", "--set", "scaling.max_spare=1", "--set", "scaling.max_servers=3",
                 "--set", "scaling.tick=0.2", "--set", "mpm.keepalive_timeout=30")
    try:
        wait_until(lambda: list(srv.states().values()) == ["idle"], WAIT, what="one idle child")
        held = srv.http()
        first = get(held, "/held")
        # the kept child is no spare: another is forked, and a newcomer is served at once
        # (before, the kept child counted as the spare and the newcomer waited keepalive_timeout)
        wait_until(lambda: len(srv.states()) == 2, WAIT, what="a second child beside the kept-alive one")
        other = srv.http()
        other.timeout = 10  # far below keepalive_timeout
        second = get(other, "/newcomer")
        assert second != first
        # both children kept alive: a third is forked (max_servers)
        third = wait_until(lambda: [p for p, state in srv.states().items() if p not in (first, second)
                                    and state == "idle"], WAIT, what="a third child")[0]
        assert srv.states() == {first: "keepalive", second: "keepalive", third: "idle"}
        other.close()
        # two idle: one too many.  The one retired is an idle one, never the kept-alive first
        # child, the oldest (the policy retires the longest-ready first)
        wait_until(lambda: len(srv.states()) == 2, WAIT, what="a surplus spare retired")
        assert srv.states()[first] == "keepalive" and get(held, "/still") == first
        held.close()
        wait_until(lambda: list(srv.states().values()) == ["idle"], WAIT, what="back to one idle child")
    finally:
        srv.stop()


# -- WorkerHandle.idle(keepalive=True) in a plain handle(conn, addr) ----------------------------------------------


def ask(f: Any, sock: socket.socket, line: bytes) -> int:
    sock.sendall(line)
    pid, echoed = f.readline().split(b" ", 1)
    assert echoed == line
    return int(pid)


def test_idle_keepalive_counts_each_request_once_and_the_connections_end_counts_none(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=1",
                 "--set", "pool.max_tasks_per_child=3", plain=True)
    try:
        wait_until(lambda: list(srv.states().values()) == ["idle"], WAIT, what="one idle child")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock, sock.makefile("rb") as f:
            pid = ask(f, sock, b"one\n")  # request 1
            one_state(srv, pid, "keepalive")
        one_state(srv, pid, "idle")  # serve.py's idle() after handle() ended the wait: no request counted
        with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock, sock.makefile("rb") as f:
            assert ask(f, sock, b"two\n") == pid  # request 2
            assert ask(f, sock, b"three\n") == pid  # request 3: the budget; it leaves after answering
            assert f.read() == b""
        wait_until(lambda: not pid_alive(pid), WAIT, what="the child to leave after its third request")
        wait_until(lambda: srv.status()["totals"]["exits"] == {"recycled": 1}, WAIT, what="its exit counted")
    finally:
        srv.stop()


# -- the metrics ------------------------------------------------------------------------------------------------


def scrape_workers(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=WAIT) as reply:
        text = reply.read().decode()
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "prefork_workers"]
    assert "keepalive" in (family.documentation or "")
    return {s.labels["state"]: s.value for s in family.samples}


def test_the_metrics_scrape_counts_kept_alive_children(server: Server) -> None:
    pytest.importorskip("prometheus_client")
    with serve_metrics(server.status, 0) as metrics:
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        conn = server.http()
        try:
            get(conn, "/metrics-test")
            seen = wait_until(lambda: (s := scrape_workers(url))["keepalive"] == 1 and s, WAIT, what="keepalive 1")
            assert seen == {"booting": 0, "idle": 1, "busy": 0, "keepalive": 1, "stopping": 0}
        finally:
            conn.close()
        wait_until(lambda: (s := scrape_workers(url))["keepalive"] == 0 and s["idle"] == 2, WAIT, what="idle again")


def snapshot(**totals: Any) -> dict[str, Any]:
    hist = {"buckets": list(BUCKETS), "counts": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
    return {
        "version": STATUS_VERSION, "name": "p", "profile": "executor", "pid": 1, "uptime": 1.0, "started": 0.0,
        "state": "running", "policy": {"name": "fixed", "workers": 1, "max_workers": 1}, "workers": [],
        "totals": {"workers": 1, "booting": 0, "idle": 1, "busy": 0, "stopping": 0, "queued": 0, "in_flight": 0,
                   "submitted": 0, "completed": 0, "failed": dict.fromkeys(FAILURE_KINDS, 0), "exits": {},
                   "spawned": 1, **totals},
        "timing": {"queue_wait": dict(hist), "run_time": dict(hist)},
    }


def test_a_snapshot_without_keepalive_reads_as_0_and_a_bad_count_is_refused() -> None:
    pytest.importorskip("prometheus_client")

    def keepalive(status: dict[str, Any]) -> float:
        [family] = [f for f in metric_families(status) if f.name == "prefork_workers"]
        return {s.labels["state"]: s.value for s in family.samples}["keepalive"]

    assert keepalive(snapshot()) == 0.0  # a pool of a prefork from before the state: the same version 1
    assert keepalive(snapshot(keepalive=3)) == 3.0
    with pytest.raises(ValueError, match=r"totals.keepalive = -1 is not a count"):
        keepalive(snapshot(keepalive=-1))


# -- the live status page, in headless chromium ------------------------------------------------------------------


def browser_missing() -> str | None:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    return f"no headless browser: {', '.join(missing)} missing" if missing else None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless chromium (as tests/test_status_page.py starts it, which writes no screenshot here)."""
    if (reason := browser_missing()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so the status page must be tested", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which("chromedriver"))))
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


CELLS = "return [...document.querySelectorAll('#board .cell.worker')].map(c => [c.className, c.textContent, c.title])"
LEGEND = "const li = document.getElementById('legend-keepalive'); return [li.hidden, li.textContent]"


def test_the_status_page_shows_a_kept_alive_child_as_k(server: Server, browser: Any) -> None:
    from prefork._status_page import serve_status_page

    with serve_status_page(server.status) as page:
        browser.get(page.url)
        wait_until(lambda: browser.execute_script(CELLS.replace("return ", "const c = ") +
                                                  "; return c.length === 2 && c.every(x => x[1] === '_')"),
                   WAIT, interval=0.05, what="two idle cells")
        assert browser.execute_script(LEGEND) == [False, "Kkeepalive"]  # prefork serve: the legend names it
        conn = server.http()
        try:
            pid = get(conn, "/page")
            cells = wait_until(lambda: [c for c in browser.execute_script(CELLS) if c[1] == "K"], WAIT,
                               interval=0.05, what="a K cell")
            [(cls, _, title)] = cells
            assert cls == "cell worker keepalive"
            assert title.splitlines()[0].endswith(f"pid {pid} \u00b7 keepalive")
        finally:
            conn.close()
        wait_until(lambda: browser.execute_script(CELLS.replace("return ", "const c = ") +
                                                  "; return c.every(x => x[0] === 'cell worker idle')"),
                   WAIT, interval=0.05, what="idle cells again")


def test_a_task_pools_status_page_leaves_keepalive_out_of_its_legend(browser: Any) -> None:
    from prefork._status_page import serve_status_page

    with serve_status_page(lambda: snapshot(keepalive=0)) as page:
        browser.get(page.url)
        wait_until(lambda: browser.execute_script("return document.getElementById('name').textContent === 'p'"),
                   WAIT, interval=0.05, what="the page rendered")
        assert browser.execute_script(LEGEND)[0] is True
