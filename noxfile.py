"""The test suite on every supported Python: ``nox -s tests-3.11 tests-3.12 tests-3.13``.

Each session installs prefork with its ``test`` extra and both first-party plugins
into a fresh virtual environment, then runs pytest (arguments after ``--`` replace
the default: the whole suite).  A Python that is not on this machine is skipped, not
an error, also under CI (``.ci/run`` runs the sessions whose Python exists).

Pythons are looked for on ``PATH`` (``python3.12``...) and, since pyenv's shims
answer to every version name whether or not it is the selected one, among pyenv's
installed versions (``$PYENV_ROOT/versions/3.12.*``): the first that runs is linked
into ``.nox/pythons``, which replaces pyenv's shims on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

VERSIONS = ("3.11", "3.12", "3.13")
HERE = Path(__file__).parent

nox.options.error_on_missing_interpreters = False  # a missing Python skips its session, even under CI
nox.options.sessions = ["tests"]


def _real(python: str | Path) -> Path | None:
    """The interpreter ``python`` runs (a shim's target), or None if it does not run."""
    try:
        proc = subprocess.run([str(python), "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def _find(version: str) -> Path | None:
    """A working interpreter for ``version``: on PATH, else one of pyenv's."""
    on_path = shutil.which(f"python{version}")
    found = _real(on_path) if on_path is not None else None
    if found is not None:
        return found
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    releases = [d for d in root.glob(f"{version}.*") if d.name.replace(".", "").isdigit()]  # not 3.13.0t, 3.12-dev
    for release in sorted(releases, key=lambda d: [int(part) for part in d.name.split(".")], reverse=True):
        found = _real(release / "bin" / f"python{version}")
        if found is not None:
            return found
    return None


def _link_pythons() -> None:
    links = HERE / ".nox" / "pythons"
    links.mkdir(parents=True, exist_ok=True)
    for version in VERSIONS:
        link = links / f"python{version}"
        link.unlink(missing_ok=True)
        found = _find(version)
        if found is not None:
            link.symlink_to(found)
    # pyenv's shims go: one answers to python3.12 even when it cannot run it (then the session
    # would fail instead of being skipped), and what they could run is linked above
    shims = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims"
    rest = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry) != shims]
    os.environ["PATH"] = os.pathsep.join([str(links), *rest])


_link_pythons()


@nox.session(python=list(VERSIONS), venv_backend="venv")
def tests(session: nox.Session) -> None:
    """The test suite (or the tests named after ``--``) on one Python."""
    session.install(".[test]", "./plugins/prefork-msgpack", "./plugins/prefork-redis")
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))
