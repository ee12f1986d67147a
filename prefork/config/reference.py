"""The configuration reference, rendered from the model and the strategy registry.

``python -m prefork.config.reference`` prints every setting of this
installation (``--builtin``: built-in strategies only, as in
docs/configuration.md; ``--write PATH``: write the file instead).
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Sequence
from typing import Any, Final

import attrs

from prefork.config.load import profile_names, profile_text
from prefork.config.model import TABLES, TOP_LEVEL_KEYS, Config, Unrepresentable, toml_value
from prefork.strategies.registry import KINDS, StrategyRegistry

__all__ = ["EXAMPLE_TOML", "render_reference"]

#: The command that regenerates docs/configuration.md.
REGENERATE: Final = "python -m prefork.config.reference --builtin --write docs/configuration.md"

#: A worked prefork.toml; the tests load it.
EXAMPLE_TOML: Final = """\
profile = "mpm"                  # start from the Apache-style profile
name = "imgserver"               # processes show as "imgserver worker"
app = "imgserver.main:serve"     # what `prefork run` runs
serializer = "pickle"            # shorthand for [serializer] name = "pickle"

[pool]
max_tasks_per_child = 1000       # recycle workers now and then
task_timeout = 30.0              # kill a worker stuck on one task for 30 s
initializer = "imgserver.main:warm_up"
initargs = ["/var/cache/imgserver"]

[scaling]                        # still "spare", as in the profile: these options layer on it
max_spare = 20
max_servers = 100

[resolver]                       # another strategy: the profile's resolver options are dropped
name = "methods"
methods = { resize = "imgserver.ops:resize", thumbnail = "imgserver.ops:thumbnail" }
"""

_INTRO: Final = """\
prefork reads its settings in three layers, each overriding the one before it key by key
(tables merge, other values replace): a packaged **profile** (`profile = "executor"` unless
the file or the keyword arguments name another), then the user's **prefork.toml**, then the
**keyword arguments** given in code, such as `load_config("prefork.toml", {"scaling.workers": 4})`.
Each of the five strategy kinds is a table holding `name` and that strategy's own options;
`transport = "pipe"` is short for `[transport] name = "pipe"`. When a later layer names a
different strategy, the earlier layers' options for that kind are dropped. Every mistake is
reported with where the value came from, the key, the value and the reason, for example
`prefork.toml: pool.task_timeout = -2.0: must be >= 0`.

A config file is a few settings: one larger than 1 MiB, or with tables or arrays nested more
than 32 levels deep, is refused with one such line before anything else is read from it.

Import paths in a config file (`app`, `plugins`, strategy names and options such as
`methods = { add = "myapp:add" }`, handlers such as `pool.initializer` and `mpm.wsgi`) are
found beside the file first: reading the file puts its directory (symlinks resolved) at the
front of `sys.path`, unless it is on it already, and leaves it there for the rest of the
process, whose workers inherit it. So `prefork run -c deploy/prefork.toml` finds
`deploy/myapp.py` from any directory. The file's directory comes first because the modules
it names are the ones beside it, as `python deploy/script.py` imports from `deploy` first;
the price is that a module there shadows a same-named one for the whole process, so keep
that directory for the config and its app. The `prefork` command looks next in the current
directory, then on the rest of `sys.path`.

`prefork check` validates without running the app, but it imports every import path in the
config (a module's top-level code runs, as with any import) and calls none of them: each one
that cannot be imported, or that names something not callable, is reported on a line of its
own, such as `prefork.toml: app = 'nosuchmod:main': cannot import it: No module named
'nosuchmod'`, and the exit code is 2. `prefork run` and `prefork serve` import the ones their
own process uses (not `boss_worker.work_handler` nor the resolvers' `methods` and `classes`,
which only workers import) before a worker starts, and stop at the first wrong one with
the same line. Every `prefork` command reports an expected failure in one such line
(`--traceback` adds the full traceback)."""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _prose(doc: str | None) -> str:
    """A docstring as Markdown paragraphs (RST roles and double backticks made plain)."""
    if not doc:
        return ""
    doc = re.sub(r":\w+:`([^`]+)`", r"`\1`", inspect.cleandoc(doc)).replace("``", "`")
    return "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


def _type(field: attrs.Attribute[Any]) -> str:
    declared = field.metadata.get("type") or field.type
    if isinstance(declared, type):
        return declared.__name__
    return str(declared) if declared is not None else ""


def _default(field: attrs.Attribute[Any]) -> str:
    default: Any = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return "(none)"
    try:
        return _code(toml_value(default))
    except Unrepresentable:
        return _code(repr(default))


def _table(fields: Sequence[attrs.Attribute[Any]], head: str) -> list[str]:
    lines = [f"| {head} | type | default | description |", "| --- | --- | --- | --- |"]
    for f in fields:
        name = f.alias or f.name
        lines.append(f"| `{name}` | {_code(_type(f))} | {_default(f)} | {_cell(f.metadata.get('doc', ''))} |")
    return lines


def _options(cls: type) -> list[attrs.Attribute[Any]]:
    return [f for f in attrs.fields(cls) if f.init] if attrs.has(cls) else []


def _split_profile(text: str) -> tuple[str, str]:
    """A profile's leading comment (what it is for) as one line, and the TOML after it."""
    lines = text.splitlines()
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return " ".join(line.lstrip("#").strip() for line in lines[:n]), "\n".join(lines[n:]).strip("\n")


def render_reference(registry: StrategyRegistry) -> str:
    """Markdown describing every setting: top-level keys, [pool], each registered strategy, the profiles."""
    out = [f"<!-- Generated by `{REGENERATE}`; do not edit. -->", "", "# Configuration", "", _INTRO, ""]
    out += ["## Example", "", "```toml", EXAMPLE_TOML.rstrip("\n"), "```", ""]
    top = [getattr(attrs.fields(Config), key) for key in TOP_LEVEL_KEYS]
    out += ["## Top-level keys", "", *_table(top, "key"), ""]
    for table, cls in TABLES.items():
        out += [f"## `[{table}]`", "", _prose(cls.__doc__), "", *_table(attrs.fields(cls), "key"), ""]
    out += ["## Strategies", "", "A strategy accepts exactly the options in its table; any other key is an error. "
            "Options described as *code only* take Python objects and are given as keyword arguments.", ""]
    for kind in KINDS:
        out += [f"### `[{kind}]`", "", _prose(getattr(attrs.fields(Config), kind).metadata["doc"]).capitalize() + ".", ""]
        for reg in registry:
            if reg.kind != kind:
                continue
            out += [f"#### `{kind} = {reg.name!r}`".replace("'", '"'), "", f"*Registered by `{reg.plugin}`.*", ""]
            doc = _prose(reg.cls.__doc__)
            if doc:
                out += [doc, ""]
            options = _options(reg.cls)
            out += (_table(options, "option") if options else ["No options."]) + [""]
    out += ["## Profiles", "", "Packaged in `prefork/config/profiles/`; pick one with `profile = \"<name>\"`.", ""]
    for name in profile_names():
        summary, body = _split_profile(profile_text(name))
        out += [f"### `{name}`", "", summary, "", "```toml", body, "```", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefork.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--builtin", action="store_true", help="built-in strategies only (no installed plugins)")
    parser.add_argument("--write", metavar="PATH", help="write the Markdown to PATH instead of printing it")
    args = parser.parse_args(argv)
    from prefork.plugins import build_plugin_manager, build_registry

    text = render_reference(build_registry(build_plugin_manager(autoload=False if args.builtin else None)))
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
