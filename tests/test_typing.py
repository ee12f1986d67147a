"""What a user's type checker sees of ``prefork``: the facades exported lazily
(``prefork.Executor``, ``prefork.MPM``...) are their real classes, not ``Any``;
and ``import prefork`` still imports none of their modules."""

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

# Lines marked "# wrong" must each be reported, and nothing else.  Before the facades
# were visible to type checkers, every line here passed: each of them was Any.
USER_FILE = """\
    import prefork
    from prefork.mpm import MPM

    pool = prefork.Executor(2)
    fut = pool.submit(len, "ab")
    n: int = fut.result()
    version: str = prefork.__version__
    mpm: type[MPM] = prefork.MPM
    facades = (prefork.BossWorker, prefork.Dispatcher, prefork.XMLRPCFront)
    s: str = fut.result()  # wrong
    e: int = prefork.Executor  # wrong
    prefork.MPM(start_servers="two")  # wrong
    pool.submit(len, "ab").nope  # wrong
    v: int = prefork.__version__  # wrong
"""


def test_mypy_strict_sees_the_lazy_exports_as_their_classes(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    source = textwrap.dedent(USER_FILE)
    (tmp_path / "user.py").write_text(source)
    wrong = {n for n, line in enumerate(source.splitlines(), 1) if line.endswith("# wrong")}
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=50,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # the editable install's import hook is invisible to mypy
    )  # fmt: skip
    reported = {int(m.group(1)) for m in re.finditer(r"^user\.py:(\d+): error:", out.stdout, re.MULTILINE)}
    assert reported == wrong, out.stdout + out.stderr
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
