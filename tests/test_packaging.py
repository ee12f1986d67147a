"""Packaging: the metadata pyproject.toml declares, the Linux-only import, the
changelog, the extras, and the one command that installs a first-party plugin."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT: dict[str, Any] = PYPROJECT["project"]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# -- import on another system ------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14"])
def test_import_fails_in_one_clear_line_on_a_system_other_than_linux(platform: str) -> None:
    code = f"import sys; sys.platform = {platform!r}; import prefork"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"ImportError: prefork runs on Linux only (it needs pidfd, memfd and prctl); this system is {platform!r}"
    )


def test_import_works_on_linux() -> None:
    proc = subprocess.run([sys.executable, "-c", "import prefork"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# -- metadata ----------------------------------------------------------------------------------


def test_the_license_is_an_spdx_expression_with_its_file() -> None:
    assert PROJECT["license"] == "MIT"  # PEP 639, not the deprecated table
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n") and "Copyright (c) " in text and "the prefork developers" in text
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]  # PEP 639 forbids both
    setuptools = Requirement(next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")))
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")  # the first with PEP 639


def test_the_classifiers_say_linux_typed_and_every_supported_python() -> None:
    classifiers = set(PROJECT["classifiers"])
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert not [c for c in classifiers if c.startswith("Operating System ::") and c != "Operating System :: POSIX :: Linux"]
    assert "Typing :: Typed" in classifiers and (ROOT / "prefork" / "py.typed").exists()
    versions = {c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    requires = SpecifierSet(PROJECT["requires-python"])
    assert versions and all(requires.contains(f"{v}.0") for v in versions)
    lowest = min(versions, key=lambda v: int(v.split(".")[1]))
    assert not requires.contains(f"3.{int(lowest.split('.')[1]) - 1}.99")  # the lowest listed is the lowest supported
    # the sessions per Python (noxfile.py) test every classified version
    noxfile = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    (tested,) = [
        ast.literal_eval(node.value) for node in noxfile.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["VERSIONS"]
    ]
    assert set(tested) == versions


def test_no_dependency_marker_excludes_every_supported_python() -> None:
    """A marker such as ``python_version < '3.11'`` under ``requires-python >= 3.11``
    is dead: it can never apply."""
    requires = SpecifierSet(PROJECT["requires-python"])
    supported = [f"3.{minor}" for minor in range(0, 40) if requires.contains(f"3.{minor}.0")]
    everything = list(PROJECT["dependencies"]) + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    for line in everything:
        marker = Requirement(line).marker
        if marker is not None and "python_version" in str(marker):
            assert any(marker.evaluate({"python_version": v, "extra": ""}) for v in supported), line


def test_the_readme_says_linux_only() -> None:
    assert re.search(r"runs on Linux only", (ROOT / "README.md").read_text(encoding="utf-8"))


# -- extras ------------------------------------------------------------------------------------


def test_the_test_extra_holds_what_the_tests_need_and_no_developer_tool() -> None:
    extras = PROJECT["optional-dependencies"]
    test, dev = _names(extras["test"]), _names(extras["dev"])
    assert {"pytest", "pytest-timeout", "hypothesis"} <= test
    assert not test & {"ruff", "nox", "scriv"}  # a developer's tools: the dev extra
    assert {"ruff", "mypy", "nox", "scriv"} <= dev
    for name in ("simulate", "progress", "metrics", "wsgi"):  # the tests of every extra run
        assert _names(extras[name]) <= test, name


def _imported_modules(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_every_package_the_tests_import_is_declared() -> None:
    """Each third-party module a test imports comes from prefork's dependencies, its
    ``test`` extra, or a first-party plugin's dependencies (the README's second command)."""
    declared = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["test"])
    for plugin in PLUGINS:
        meta = tomllib.loads((plugin / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        declared |= {canonicalize_name(meta["name"])} | _names(meta["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "plugins").glob("*/tests/**/*.py")]
    undeclared = []
    for path in files:
        for top in _imported_modules(path) - set(sys.stdlib_module_names):
            if any((where / top).exists() or (where / f"{top}.py").exists() for where in (ROOT, path.parent)):
                continue  # the repository's own (prefork, examples, benchmarks, a test helper)
            names = {canonicalize_name(d) for d in distributions.get(top, [])}
            if not names & declared:
                undeclared.append(f"{path.relative_to(ROOT)}: {top} ({', '.join(sorted(names)) or 'not installed'})")
    assert not undeclared, "\n".join(undeclared)


# -- changelog ---------------------------------------------------------------------------------


def test_the_changelog_has_the_current_version_and_its_fragments_have_known_sections() -> None:
    scriv = PYPROJECT["tool"]["scriv"]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "<!-- scriv-insert-here -->" in changelog
    assert re.search(rf"^## {re.escape(PROJECT['version'])}\b", changelog, re.MULTILINE)
    fragments = ROOT / "changelog.d"
    assert (fragments / "README.md").exists()  # where fragments go, and how (scriv skips README.*)
    for fragment in fragments.glob("*.md"):
        if fragment.name.startswith("README."):
            continue
        headings = re.findall(r"^###\s+(.+?)\s*$", fragment.read_text(encoding="utf-8"), re.MULTILINE)
        assert headings and set(headings) <= set(scriv["categories"]), f"{fragment.name}: {headings}"


# -- the plugins install beside prefork ----------------------------------------------------------


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _pip(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_REQUIRE_VIRTUALENV"))}
    return subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=540, cwd=cwd, env=env,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_plugin_installs_from_the_repository_with_prefork_in_the_same_command(tmp_path: Path) -> None:
    """``pip install . ./plugins/prefork-msgpack`` (the README's) in a fresh virtual
    environment: prefork and the plugin, whose entry point prefork then loads.  Alone,
    the plugin cannot be installed: prefork is on no package index.  (Uses pip's index
    and cache as configured, as the README's commands do.)"""
    python = _fresh_venv(tmp_path / "venv")
    alone = _pip(python, "./plugins/prefork-msgpack", cwd=ROOT)
    assert alone.returncode != 0
    assert re.search(r"No matching distribution found for prefork\b", alone.stdout + alone.stderr), alone.stderr[-2000:]

    both = _pip(python, ".", "./plugins/prefork-msgpack", cwd=ROOT)
    assert both.returncode == 0, both.stderr[-3000:]
    # from another directory, so that the checkout's prefork/ is not the one imported
    proc = subprocess.run(
        [str(python.parent / "prefork"), "plugins"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "serializer 'msgpack' (prefork_msgpack.MsgpackSerializer)" in proc.stdout, proc.stdout
