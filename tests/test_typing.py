"""What a user's type checker sees of ``prefork``: the facades exported lazily
(``prefork.Executor``, ``prefork.MPM``...) are their real classes, not ``Any``;
``submit`` checks its arguments against the function (``ParamSpec``) and types the
future by its result; the maps are typed as ``builtins.map`` is (``map`` within what
``concurrent.futures.Executor.map`` must take); and ``import prefork`` still imports
none of the facades' modules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import prefork

ROOT = Path(prefork.__file__).resolve().parent.parent
FACADES = ("prefork.executor", "prefork.bossworker", "prefork.dispatcher", "prefork.mpm")

# A line marked "# wrong: CODE" must be reported with exactly that error code, and no
# other line may be reported: every unmarked line is accepted, and assert_type pins the
# type mypy sees.  Before the facades were visible to type checkers every line passed
# (each was Any); before submit took a ParamSpec, so did the submits with the wrong arguments.
USER_FILE = """\
    from collections.abc import Callable, Iterator
    from concurrent.futures import Executor as StdExecutor
    from concurrent.futures import Future
    from typing import ParamSpec, TypeVar, assert_type

    import prefork
    from prefork.mpm import MPM

    P = ParamSpec("P")
    T = TypeVar("T")


    def square(x: int) -> int:
        return x * x


    def label(n: int, unit: str = "s") -> str:
        return f"{n} {unit}"


    def same(x: T) -> T:
        return x


    def add(sender: object, a: int, b: int) -> int:
        return a + b


    def serve(n: int, name: str) -> None: ...
    def wait() -> None: ...
    def on_response(response: object) -> None: ...
    def on_data(pid: int) -> None: ...
    def on_std(pool: StdExecutor) -> None: ...


    class Logged(prefork.Executor):
        def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
            return super().submit(fn, *args, **kwargs)


    pool = prefork.Executor(2)
    fut = pool.submit(len, "ab")
    n: int = fut.result()
    version: str = prefork.__version__
    mpm: type[MPM] = prefork.MPM
    facades = (prefork.BossWorker, prefork.Dispatcher, prefork.XMLRPCFront)
    s: str = fut.result()  # wrong: assignment
    e: int = prefork.Executor  # wrong: assignment
    prefork.MPM(start_servers="two")  # wrong: arg-type
    pool.submit(len, "ab").nope  # wrong: attr-defined
    v: int = prefork.__version__  # wrong: assignment

    assert_type(pool.submit(square, 3), Future[int])
    assert_type(pool.submit(label, 3, unit="ms").result(), str)
    assert_type(pool.options(timeout=2).submit(square, x=3), Future[int])
    pool.submit(square, "x")  # wrong: arg-type
    pool.submit(square)  # wrong: call-arg
    pool.submit(square, 1, 2)  # wrong: call-arg
    pool.submit(label, 1, units="ms")  # wrong: call-arg
    pool.options(timeout=2).submit(square, "x")  # wrong: arg-type
    r: str = pool.submit(square, 3).result()  # wrong: assignment

    assert_type(pool.map(square, [1, 2]), Iterator[int])
    assert_type(pool.map(same, ["a"]), Iterator[str])
    assert_type(pool.map(label, [1], ["m"], timeout=5, chunksize=2, buffersize=4), Iterator[str])
    assert_type(pool.options(timeout=1).map(square, range(3)), Iterator[int])
    assert_type(pool.map_unordered(lambda x: x * 2.0, [1]), Iterator[float])
    assert_type(pool.options(timeout=1).map_unordered(label, [1], ["m"], progress=False), Iterator[str])
    pool.map(square, ["x"])  # concurrent.futures.Executor.map takes it, so an Executor must
    names: Iterator[str] = pool.map(square, [1])  # wrong: arg-type
    pool.map_unordered(square, ["x"])  # wrong: arg-type
    pool.options(timeout=1).map_unordered(label, ["m"], [1])  # wrong: arg-type
    pool.map(square, [1], timeout="soon")  # wrong: call-overload
    pool.map_unordered(square, [1], chunk=2)  # wrong: call-overload

    on_std(pool)
    with Logged(1) as mine:
        assert_type(mine, Logged)
        assert_type(mine.submit(square, 2), Future[int])

    with prefork.BossWorker(square) as boss:
        assert_type(boss, prefork.BossWorker)
        assert_type(boss.add_work(1, 2), list[int])
    with prefork.Dispatcher(methods={"add": add, "sub": "mymod:sub"}) as d:
        assert_type(d, prefork.Dispatcher)
        with prefork.XMLRPCFront(d) as front:
            assert_type(front, prefork.XMLRPCFront)
    prefork.Dispatcher(methods={"add": 3})  # wrong: dict-item
    prefork.Dispatcher(upon_result=lambda request, response: None)
    prefork.Dispatcher(upon_result=on_response)  # wrong: arg-type


    async def ask(d: prefork.Dispatcher) -> None:
        assert_type(await d.call(add, 1, 2, from_="me"), int | dict[str, str])
        await d.call("add", 1, "two")  # by name: nothing to check against
        await d.call(add, 1)  # wrong: arg-type


    m = MPM(child_data_hook=lambda pid, data, exitcode: None, child_sigh={"HUP": "IGNORE"})
    m.whip_kids(serve, (1, "a"))
    m.whip_kids(wait)
    m.whip_kids(serve, [1, "a"])  # the seed's list: not checked
    m.whip_kids(serve, (1, 2))  # wrong: arg-type
    m.whip_kids(serve)  # wrong: arg-type
    MPM(child_data_hook=on_data)  # wrong: arg-type
"""


def test_mypy_strict_accepts_and_rejects_each_line_of_a_user_file_as_marked(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    source = textwrap.dedent(USER_FILE)
    (tmp_path / "user.py").write_text(source)
    wrong = {n: m.group(1) for n, line in enumerate(source.splitlines(), 1) if (m := re.search(r"# wrong: (\S+)$", line))}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--show-error-codes", "--hide-error-context", "--cache-dir", str(tmp_path / ".mypy_cache"), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # the editable install's import hook is invisible to mypy
    )  # fmt: skip
    reported: dict[int, set[str]] = {}
    for m in re.finditer(r"^user\.py:(\d+): error: .*\[([a-z-]+)\]$", out.stdout, re.MULTILINE):
        reported.setdefault(int(m.group(1)), set()).add(m.group(2))
    lines = source.splitlines()
    unexpected = {n: (codes, lines[n - 1].strip()) for n, codes in reported.items() if codes != {wrong.get(n)}}
    missed = {n: (code, lines[n - 1].strip()) for n, code in wrong.items() if n not in reported}
    assert not unexpected and not missed, f"{unexpected=}\n{missed=}\n" + out.stdout + out.stderr
    assert out.returncode == 1, out.stdout + out.stderr


def test_import_prefork_imports_no_facade_and_every_export_resolves() -> None:
    code = (
        "import sys, prefork\n"
        f"print(*[m for m in {FACADES!r} if m in sys.modules])\n"
        "for name in prefork.__all__: getattr(prefork, name)\n"
        "import prefork.mpm\n"
        "assert prefork.MPM is prefork.mpm.MPM\n"
        "assert isinstance(prefork.__version__, str)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import prefork imported {out.stdout.strip()}"


def test_mpm_is_exported_like_the_other_facades() -> None:
    assert "MPM" in prefork.__all__ and "BossWorker" in prefork.__all__
