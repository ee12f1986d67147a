"""Every python, toml and sh block in README.md and docs/**/*.md: run or checked here, run by
a test named in the Markdown, or marked as not runnable with the reason.  No block is
skipped silently: one this module cannot place fails.

Blocks are marked by HTML comments on the lines right above the fence (invisible on the
site; several may stack, and a page with a collector of its own keeps that collector's mark
on the line nearest the fence).  This module reads:

``<!-- file: NAME -->``
    a file the page's reader saves (``myapp.py``, ``tuned.toml``): written into the directory
    where the page's blocks run, and checked as a block of its language.
``<!-- snippet: tests/test_x.py::test_name -->``
    run by that test: this module checks that pytest collects it and that its module names
    the page.
``<!-- snippet: serves HOST:PORT -->``
    a python server: started, sent a line that must come back, stopped by SIGTERM; it must
    exit 0.
``<!-- snippet: skip (REASON) -->``
    not run, for the reason given (required).
``<!-- snippet: env NAME=VALUE ... -->``
    with those environment variables (as the page told the reader to export), besides one
    of the above or none.

Unmarked blocks:

python
    run as a script in a fresh directory holding the page's files, the repository root on
    ``PYTHONPATH`` (as from a clone); it must exit 0 within ``TIMEOUT`` seconds.
toml
    parsed; a ``pyproject.toml`` part (``[project]``, ``[build-system]``, ``[tool]``) stops
    there, any other is a prefork config: loaded with ``prefork.load_config`` in that directory.
sh
    every command (comments aside) is a ``prefork`` command line that prefork's argument
    parser takes: parsed, not run.  Any other command needs a mark.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0  # seconds for one block to run; generous for a loaded machine
LANGS = {"python": "python", "py": "python", "toml": "toml", "sh": "sh", "bash": "sh", "shell": "sh"}
PYPROJECT_TABLES = {"project", "build-system", "tool"}


class Block(NamedTuple):
    page: str  #: the page, relative to the repository root
    line: int  #: the fence's line, 1-based
    lang: str  #: "python", "toml", "sh", or the fence's own word for other blocks
    marks: tuple[str, ...]  #: the HTML comments right above the fence, top to bottom
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def file(self) -> str | None:
        return next((m.removeprefix("file: ") for m in self.marks if m.startswith("file: ")), None)

    @property
    def snippet(self) -> str | None:
        found = [m.removeprefix("snippet:").strip() for m in self.marks if m.startswith("snippet:")]
        found = [m for m in found if not m.startswith("env ")]
        assert len(found) <= 1, f"{self.where}: more than one snippet mark: {found}"
        return found[0] if found else None

    @property
    def env(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for m in self.marks:
            if m.startswith("snippet:") and (words := m.removeprefix("snippet:").split())[:1] == ["env"]:
                for word in words[1:]:
                    name, eq, value = word.partition("=")
                    assert eq and name, f"{self.where}: snippet: env takes NAME=VALUE words, not {word!r}"
                    found[name] = value
        return found


def blocks_of(text: str, page: str) -> list[Block]:
    """The fenced blocks of a Markdown text, indented ones (in a list item) included."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        close = fence.group(2)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == close), None)
        assert end is not None, f"{page}:{i + 1}: a code block that is never closed"
        marks: list[str] = []
        k = i - 1
        while k >= 0 and (m := re.match(r"^\s*<!--\s*(.*?)\s*-->\s*$", lines[k])):
            marks.insert(0, m.group(1))
            k -= 1
        word = fence.group(3).lower()
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        found.append(Block(page, i + 1, LANGS.get(word, word), tuple(marks), code))
        i = end + 1
    return found


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


BLOCKS = [b for p in pages() for b in blocks_of(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())]
CHECKED = [b for b in BLOCKS if b.lang in ("python", "toml", "sh")]


# -- what each block is ----------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    action: str  #: "run", "load", "parse", "serve", "tested", "skip", "file"
    detail: str = ""  #: the test, the address, the reason


def plan(block: Block, page_blocks: list[Block] | None = None) -> Plan:
    """What this module does with a block, or an ``AssertionError`` naming the block and what it lacks."""
    mark = block.snippet
    if mark is not None:
        if m := re.fullmatch(r"skip \((.*\S.*)\)", mark):
            return Plan("skip", m.group(1))
        if m := re.fullmatch(r"(tests/[\w/]+\.py::[\w:]+)", mark):
            return Plan("tested", m.group(1))
        if m := re.fullmatch(r"serves ([\w.-]+:\d+)", mark):
            assert block.lang == "python", f"{block.where}: only a python block can serve"
            return Plan("serve", m.group(1))
        raise AssertionError(
            f"{block.where}: snippet mark {mark!r} is none of 'skip (REASON)', 'tests/test_x.py::test_name', "
            "'serves HOST:PORT'"
        )
    if block.file is not None:
        users = [b for b in page_blocks or [] if b is not block and Path(block.file).stem in b.code]
        assert users, f"{block.where}: the file {block.file} is used by no other block of the page"
        return Plan("file", block.file)
    if block.lang == "python":
        return Plan("run")
    if block.lang == "toml":
        return Plan("load")
    if block.lang == "sh":
        for command in commands(block.code):
            assert command[:1] == ["prefork"], (
                f"{block.where}: `{shlex.join(command)}` is not a prefork command, so nothing runs it; mark the "
                f"block (see {__name__})"
            )
        return Plan("parse")
    raise AssertionError(f"{block.where}: no plan for a {block.lang} block")


SEPARATORS = {"&&", "||", ";", "|", "&"}


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block: comments dropped, ``\\`` continuations joined, and
    ``a && b``, ``a | b``, ``a; b`` taken as two."""
    found: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                if argv:
                    found.append(argv)
                argv = []
            else:
                argv.append(token)
    return found


def page_blocks(block: Block) -> list[Block]:
    return [b for b in BLOCKS if b.page == block.page]


def ids(block: Block) -> str:
    return block.where


def of(action: str) -> list[Block]:
    found = []
    for b in CHECKED:
        try:
            if plan(b, page_blocks(b)).action == action:
                found.append(b)
        except AssertionError:
            pass  # test_every_block_is_run_checked_or_says_why names it
    return found


def test_every_block_is_run_checked_or_says_why() -> None:
    problems = []
    for block in CHECKED:
        try:
            plan(block, page_blocks(block))
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)
    assert len(CHECKED) >= 90 and {b.page for b in CHECKED} >= {"README.md", "docs/plugins.md"}


# -- the directory a page's blocks run in -----------------------------------------------------------------------------


@pytest.fixture
def page_dir(block: Block, tmp_path: Path) -> Path:
    """A directory holding the ``file:`` blocks of the block's page."""
    for b in page_blocks(block):
        if b.file is not None:
            path = tmp_path / b.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.code, encoding="utf-8")
    return tmp_path


def environment(directory: Path, block: Block) -> dict[str, str]:
    """The caller's environment without prefork's variables, plus the block's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(directory), str(ROOT)])
    return env | block.env


def run_python(block: Block, directory: Path) -> subprocess.CompletedProcess[str]:
    script = directory / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    try:
        return subprocess.run([sys.executable, str(script)], cwd=directory, env=environment(directory, block),
                              capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.where}: still running after {TIMEOUT:.0f} s\n{e.stdout!r}\n{e.stderr!r}", pytrace=False)


# -- python ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("run"), ids=ids)
def test_python_block_runs(block: Block, page_dir: Path) -> None:
    proc = run_python(block, page_dir)
    assert proc.returncode == 0, f"{block.where}: exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback (most recent call last)" not in proc.stderr, f"{block.where}: exits 0 but says\n{proc.stderr}"


@pytest.mark.parametrize("block", [b for b in of("file") if b.lang == "python"], ids=ids)
def test_python_file_compiles(block: Block) -> None:
    compile(block.code, block.where, "exec")  # run by the blocks that import it


@pytest.fixture
def served(block: Block, page_dir: Path) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    host, port = plan(block).detail.rsplit(":", 1)
    with socket.socket() as probe:  # else the test could talk to another server there
        if probe.connect_ex((host, int(port))) == 0:
            pytest.fail(f"{block.where}: something listens on {host}:{port} already; the block's server needs it")
    script = page_dir / "server.py"
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=page_dir, env=environment(page_dir, block), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc, (host, int(port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)


@pytest.mark.parametrize("block", of("serve"), ids=ids)
def test_python_server_block_serves_and_stops_on_sigterm(
    block: Block, served: tuple[subprocess.Popen[str], tuple[str, int]]
) -> None:
    proc, address = served
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, f"{block.where}: exited ({proc.returncode}) before serving\n{proc.communicate()}"
        try:
            conn = socket.create_connection(address, timeout=1.0)
            break
        except OSError:
            assert time.monotonic() < deadline, f"{block.where}: nothing listens on {address} after {TIMEOUT:.0f} s"
            time.sleep(0.05)
    with conn:
        conn.settimeout(TIMEOUT)
        conn.sendall(b"hello\n")
        got = b""
        while not got.endswith(b"\n"):
            data = conn.recv(4096)
            assert data, f"{block.where}: closed before answering; got {got!r}"
            got += data
        assert got == b"hello\n", block.where
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{block.where}: exit status {proc.returncode} after SIGTERM\n{out}\n{err}"


# -- toml --------------------------------------------------------------------------------------------------------------

LOAD = """\
import sys
from prefork import load_config
from prefork.errors import PreforkError
try:
    load_config(sys.argv[1])
except PreforkError as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


@pytest.mark.parametrize("block", of("load") + [b for b in of("file") if b.lang == "toml"], ids=ids)
def test_toml_block_parses_and_a_config_loads(block: Block, page_dir: Path) -> None:
    try:
        data = tomllib.loads(block.code)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"{block.where}: not TOML: {e}", pytrace=False)
    if PYPROJECT_TABLES & set(data):
        assert not set(data) - PYPROJECT_TABLES, f"{block.where}: a pyproject.toml part mixed with other keys"
        return
    config = page_dir / (block.file or "prefork.toml")
    config.write_text(block.code, encoding="utf-8")
    loader = page_dir / "load_config_of_the_block.py"
    loader.write_text(LOAD, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(loader), str(config)], cwd=page_dir, env=environment(page_dir, block),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{block.where}: load_config refuses it: {proc.stderr.strip()}"


# -- sh ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("parse"), ids=ids)
def test_sh_block_is_prefork_commands_the_cli_takes(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    from prefork.cli import build_parser

    for argv in commands(block.code):
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as e:
            if e.code:
                pytest.fail(f"{block.where}: `{shlex.join(argv)}`: {capsys.readouterr().err.strip()}", pytrace=False)


# -- blocks run by other tests -----------------------------------------------------------------------------------------


def collected(modules: set[str]) -> set[str]:
    """The node ids pytest collects from ``modules``, parameters dropped."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *sorted(modules)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert proc.returncode == 0, f"collecting {sorted(modules)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {re.sub(r"\[.*\]$", "", line.strip()) for line in proc.stdout.splitlines() if "::" in line}


def unfound(tested: list[tuple[Block, str]]) -> list[str]:
    """What is wrong with the tests the blocks name: one line each."""
    found = collected({test.partition("::")[0] for _, test in tested})
    problems = []
    for block, test in tested:
        module = test.partition("::")[0]
        if test not in found:
            problems.append(f"{block.where}: {test} is not a test pytest collects")
        elif Path(block.page).name not in (ROOT / module).read_text(encoding="utf-8"):
            problems.append(f"{block.where}: {module} never names {Path(block.page).name}")
    return problems


def test_the_tests_named_in_the_markdown_exist_and_name_the_page() -> None:
    tested = [(b, plan(b).detail) for b in of("tested")]
    assert len(tested) >= 30
    problems = unfound(tested)
    assert not problems, "\n".join(problems)


def test_a_named_test_that_is_not_collected_or_does_not_name_the_page_is_reported() -> None:
    here = "tests/test_doc_snippets.py"
    name = "x" * 3 + "-page.md"  # a page this module never names
    page, readme = Block(f"docs/{name}", 3, "python", (), ""), Block("README.md", 9, "python", (), "")
    assert unfound([(page, f"{here}::test_no_such_test"), (page, f"{here}::test_the_collector_reads_marks"),
                    (readme, f"{here}::test_the_collector_reads_marks")]) == [
        f"docs/{name}:3: {here}::test_no_such_test is not a test pytest collects",
        f"docs/{name}:3: {here} never names {name}",
    ]


PROSE_TEST = re.compile(r"`((?:plugins/[\w-]+/)?tests/[\w/]+\.py|test_\w+\.py)?(::\w+(?:::\w+)?)?(?:\[[^`]*\])?`")


def module_named(name: str) -> str:
    """A module named in prose: its path, or for a bare ``test_x.py`` the one file of that name
    in the repository's tests (left as it is when there is none, or several)."""
    if "/" in name:
        return name
    found = [p for tree in (ROOT / "tests", *ROOT.glob("plugins/*/tests")) for p in tree.rglob(name)]
    return found[0].relative_to(ROOT).as_posix() if len(found) == 1 else name


def named_in_prose(text: str, page: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The tests a page's prose names in backticks (``tests/x.py::test_y``; a bare
    ``::test_z`` after it, on the same line, is in the same module, and elsewhere in the
    module the page names in "Test names starting with `::` are in `tests/...`"), and the
    references that name no module."""
    named, problems = [], []
    default = re.search(r"Test names starting with `::` are in `(tests/[\w/]+\.py)`", text)
    for number, line in enumerate(text.splitlines(), 1):
        module = default.group(1) if default else ""
        for match in PROSE_TEST.finditer(line):
            module = module_named(match.group(1)) if match.group(1) else module
            if match.group(2) is None:
                if match.group(1) and "/" in module:  # a bare test_x.py we do not have is the reader's file
                    named.append((f"{page}:{number}", module))
            elif not module:
                problems.append(f"{page}:{number}: `{match.group(2)}` follows no tests/ module on its line")
            else:
                named.append((f"{page}:{number}", module + match.group(2)))
    return named, problems


def misnamed(named: list[tuple[str, str]]) -> list[str]:
    """The named tests pytest does not collect, and the named modules that do not exist."""
    modules = {test.partition("::")[0] for _, test in named if (ROOT / test.partition("::")[0]).is_file()}
    trees: dict[str, set[str]] = {}  # each plugin's tests apart: their conftest.py would clash with ours
    for m in modules:
        if Path(m).name.startswith("test_"):
            trees.setdefault(m.split("/tests/")[0] if m.startswith("plugins/") else "", set()).add(m)
    found = set().union(*(collected(group) for group in trees.values()))
    problems = []
    for where, test in named:
        module, _, name = test.partition("::")
        if not (ROOT / module).is_file():
            problems.append(f"{where}: {module} does not exist")
        elif name and test not in found:
            problems.append(f"{where}: {test} is not a test pytest collects")
    return problems


def test_the_tests_the_prose_names_exist() -> None:
    """docs/reliability.md's table and the other pages name the tests behind each promise:
    a test renamed or moved leaves a promise pointing at nothing."""
    named, problems = [], []
    for path in pages():
        page = str(path.relative_to(ROOT))
        found, wrong = named_in_prose(path.read_text(encoding="utf-8"), page)
        named += found
        problems += wrong
    assert len(named) >= 40
    problems += misnamed(named)
    assert not problems, "\n".join(problems)


def test_a_test_named_in_prose_under_the_wrong_module_is_reported() -> None:
    here = "tests/test_doc_snippets.py"
    text = (f"| row | `{here}::test_the_collector_reads_marks`, `::test_no_such_test` |\n"
            "| next | `::test_the_collector_reads_marks` and `tests/no_such_module.py` |\n")
    named, problems = named_in_prose(text, "page.md")
    assert problems == ["page.md:2: `::test_the_collector_reads_marks` follows no tests/ module on its line"]
    assert named_in_prose(f"Test names starting with `::` are in `{here}`.\n\n{text}", "page.md")[1] == []
    assert misnamed(named) == [f"page.md:1: {here}::test_no_such_test is not a test pytest collects",
                               "page.md:2: tests/no_such_module.py does not exist"]


# -- the collector itself ----------------------------------------------------------------------------------------------

SAMPLE = """\
# A page

<!-- snippet: skip (needs a running redis) -->
```python
import redis
```

<!-- run -->
<!-- snippet: tests/test_doc_snippets.py::test_the_collector_reads_marks -->
```python
print(1)
```

- in a list:

  ```sh
  prefork check -c prefork.toml   # validate
  ```

<!-- file: myapp.py -->
```python
def main(pool): ...
```

<!-- snippet: env MYAPP_KEY=k1 MYAPP_MODE=a=b -->
```toml
app = "myapp:main"
```
"""


def test_the_collector_reads_marks() -> None:
    found = blocks_of(SAMPLE, "page.md")
    assert [(b.line, b.lang) for b in found] == [(4, "python"), (10, "python"), (16, "sh"), (21, "python"), (26, "toml")]
    assert found[4].env == {"MYAPP_KEY": "k1", "MYAPP_MODE": "a=b"} and found[0].env == {}
    assert [plan(b, found) for b in found] == [
        Plan("skip", "needs a running redis"),
        Plan("tested", "tests/test_doc_snippets.py::test_the_collector_reads_marks"),
        Plan("parse"),
        Plan("file", "myapp.py"),
        Plan("load"),
    ]
    assert found[1].marks == ("run", "snippet: tests/test_doc_snippets.py::test_the_collector_reads_marks")
    assert commands(found[2].code) == [["prefork", "check", "-c", "prefork.toml"]]
    assert commands("pip install . && prefork run  # two\nprefork ctl web \\\n  stop | cat; ls\n") == [
        ["pip", "install", "."], ["prefork", "run"], ["prefork", "ctl", "web", "stop"], ["cat"], ["ls"]]


@pytest.mark.parametrize(
    "text, says",
    [
        ("```sh\npip install prefork\n```\n", "`pip install prefork` is not a prefork command"),
        ("```sh\nprefork check && rm -r build\n```\n", "`rm -r build` is not a prefork command"),
        ("<!-- snippet: skip -->\n```python\npass\n```\n", "snippet mark 'skip' is none of"),
        ("<!-- snippet: skip () -->\n```python\npass\n```\n", "snippet mark 'skip ()' is none of"),
        ("<!-- snippet: serves 127.0.0.1:1 -->\n```toml\n```\n", "only a python block can serve"),
        ("<!-- file: lonely.py -->\n```python\npass\n```\n", "the file lonely.py is used by no other block"),
        ("<!-- snippet: skip (a) -->\n<!-- snippet: skip (b) -->\n```python\npass\n```\n", "more than one snippet mark"),
    ],
)
def test_a_block_without_a_way_to_run_it_or_a_reason_fails(text: str, says: str) -> None:
    found = blocks_of(text, "page.md")
    with pytest.raises(AssertionError, match=re.escape(f"page.md:{found[0].line}: {says}")):
        plan(found[0], found)


def test_a_block_never_closed_is_named() -> None:
    with pytest.raises(AssertionError, match=r"page.md:2: a code block that is never closed"):
        blocks_of("text\n```python\npass\n", "page.md")
