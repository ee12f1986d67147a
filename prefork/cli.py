"""The ``prefork`` command.

    prefork run [-c prefork.toml] [--set key=value ...]
    prefork serve [-c prefork.toml] [--set key=value ...]
    prefork check [-c prefork.toml] [--set key=value ...]
    prefork plugins [-c prefork.toml]
    prefork simulate [--policy NAME | -c prefork.toml] [--trace FILE.csv | --poisson RATE ...] [--chart out.png]
    prefork status / prefork ctl (prefork._control_cli), prefork --version

Without ``-c``, ``./prefork.toml`` is read when it exists.  Import paths in the
config are found in the config file's directory first, then in the current
directory, then on ``sys.path`` (``prefork.config._imports``).  ``run`` imports
the config's ``app = "module:callable"``, builds the pool the profile names,
calls ``app(pool)`` and shuts the pool down; SIGINT and SIGTERM stop it promptly
(queued tasks are cancelled, running ones get ``pool.kill_grace`` seconds, then
their workers are killed).  The exit code is the app's return value when it is an int.

Every command reports an expected failure (a bad setting, an import path that
cannot be imported, a port in use, a pool whose workers cannot boot, a file it
cannot read) as one line, ``prefork: error: ...``, with exit code 2 for bad
input and 1 otherwise; ``--traceback`` shows the full traceback as well.  An
exception the app itself lets out of ``app(pool)`` is the app's: shown with its
traceback, as Python would, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tomllib
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

import prefork
from prefork import _logging, _progress
from prefork._operate import DERIVED
from prefork._proctitle import set_title
from prefork.config import Config, load_config
from prefork.config._imports import import_problems, import_setting
from prefork.errors import ConfigError, MissingExtra, PluginError, PreforkError, error_text
from prefork.strategies.registry import KINDS


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM, so ``finally`` blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _AppFailed(Exception):
    """An exception other than prefork's own let out of ``app(pool)`` (its ``__cause__``):
    the app's to show, with its traceback."""


def _guarded(app: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        try:
            return app(*args)
        except PreforkError:
            raise
        except Exception as exc:
            raise _AppFailed() from exc

    return call


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; the value is read as TOML (``4``, ``"x"``, ``[1, 2]``), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, for example --set scaling.workers=4")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            value = raw
        out[key.strip()] = value
    return out


def _config_path(arg: str | None) -> str | None:
    if arg is not None:
        return arg
    return "prefork.toml" if Path("prefork.toml").is_file() else None


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args.config), _parse_set(args.set))


def _cwd_importable() -> None:
    """The current directory on ``sys.path`` (at the front, unless it is on it already), as
    ``python -m`` does; a config file's directory goes before it when the config is read."""
    here = os.getcwd()
    if here not in {os.path.realpath(entry or os.curdir) for entry in sys.path if isinstance(entry, str)}:
        sys.path.insert(0, here)


def _operable(config: Config) -> Config:
    """A pool started by ``prefork run`` or ``serve``: its control socket on unless the
    config says ``[control] enabled = false``; named after its app unless named."""
    if "control.enabled" not in config.sources:
        config = attrs.evolve(config, control=attrs.evolve(config.control, enabled=True))
    app = config.app or config.mpm.wsgi
    if _named_by_profile(config) and app:
        module = app.partition(":")[0]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", module).lstrip(".-")[:64] or config.name
        config = attrs.evolve(config, name=name, sources={**config.sources, "name": DERIVED})
    return config


def _named_by_profile(config: Config) -> bool:
    source = str(config.sources.get("name", "defaults"))
    return source == "defaults" or source.startswith("profile ")


def _run_executor(config: Config, app: Callable[..., Any], progress: Any = None) -> Any:
    from prefork.executor import Executor

    pool = Executor(config=config, progress=progress or False)
    try:
        return app(pool)
    except BaseException:
        pool.terminate()  # stopped (a signal) or failed: cancel what waits, then kill_grace
        raise
    finally:
        pool.shutdown(wait=True)


def _run_boss_worker(config: Config, app: Callable[..., Any], progress: Any = None) -> Any:
    from prefork.bossworker import BossWorker

    boss = BossWorker.from_config(config, progress=progress or False)
    try:
        return app(boss)
    except BaseException:
        boss.shut_down(force=True)
        raise
    finally:
        boss.shut_down()


def _run_dispatcher(config: Config, app: Callable[..., Any], progress: Any = None) -> Any:
    from prefork.dispatcher import Dispatcher

    dispatcher = Dispatcher.from_config(config, progress=progress or False)
    try:
        return app(dispatcher)
    finally:
        dispatcher.shutdown()


def _run_mpm(config: Config, app: Callable[..., Any], progress: Any = None) -> Any:
    from prefork.mpm import MPM

    server = MPM.from_config(config)
    owner = os.getpid()
    try:
        return app(server)  # the app drives it: `while server.whip_kids(code, args): ...`
    finally:
        if os.getpid() == owner:  # a kid_new child returning here must not stop the pool
            server.done()


#: How ``prefork run`` builds the pool of each profile and hands it to the app.
RUNNERS: dict[str, Callable[[Config, Callable[..., Any], Any], Any]] = {
    "executor": _run_executor,
    "boss-worker": _run_boss_worker,
    "dispatcher": _run_dispatcher,
    "mpm": _run_mpm,
}


def cmd_run(args: argparse.Namespace) -> int:
    _logging.configure(args.log_level, args.log_format)
    _logging.set_role("supervisor")
    config = _operable(_load(args))
    if config.mpm.wsgi:
        raise ConfigError(f"mpm.wsgi = {config.mpm.wsgi!r} is for `prefork serve`; `prefork run` starts app = "
                          "\"module:callable\" with the pool")
    if not config.app:
        raise ConfigError(
            f"{_config_path(args.config) or 'the configuration'}: app is empty; "
            "set app = \"module:callable\" to name what `prefork run` starts"
        )
    runner = RUNNERS.get(config.profile)
    if runner is None:
        raise ConfigError(
            f"profile {config.profile!r} cannot be started by `prefork run` yet "
            f"(profiles it runs: {', '.join(sorted(RUNNERS))})"
        )
    problems = import_problems(config, in_worker=False)  # what this process imports anyway, before a pool starts
    if problems:
        raise problems[0]
    app = import_setting(config, "app", config.app)
    bar = _run_bar(config, app, args.progress)

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    set_title(f"{config.name} supervisor")
    try:
        result = runner(config, _guarded(app), bar)
    except _Stop as stop:
        print(f"prefork: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
    if isinstance(result, bool):
        return 0 if result else 1
    return result if isinstance(result, int) else 0


def _run_bar(config: Config, app: Any, mode: str) -> Any:
    """The bar of an app that declares ``progress_total`` (docs/progress.md), on a terminal or forced."""
    try:
        total = _progress.declared_total(app)
    except TypeError as exc:
        raise ConfigError(f"app = {config.app!r}: {exc}") from exc
    if total is None or mode == "off" or config.profile == "mpm":
        return None
    try:
        return _progress.bar_for_run(total, sys.stderr, force=mode == "force")
    except MissingExtra as exc:
        if mode == "force":
            raise
        print(f"prefork run: no progress bar: {exc}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    from prefork.serve import serve

    _logging.configure(args.log_level, args.log_format)
    overrides = _parse_set(args.set)
    if args.wsgi is not None:
        overrides["mpm.wsgi"] = args.wsgi
    path = _config_path(args.config)
    if path is None:
        overrides.setdefault("profile", "mpm")
    config = _operable(load_config(path, overrides))
    if config.scaling.name != "spare":
        print(f"prefork serve: note: scaling is {config.scaling.name!r}, not 'spare'", file=sys.stderr)
    return serve(config, lambda host, port: print(f"prefork serve: listening on {host}:{port}", flush=True))


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and import every import path in it (``app``, ``mpm.wsgi``,
    ``pool.initializer`` ...; plugins and strategies are imported by loading it), calling
    none: each one that is wrong is a line of its own."""
    config = _load(args)
    problems = import_problems(config)
    for problem in problems:
        _report(problem, args.traceback)
    if problems:
        return 2
    sys.stdout.write(config.to_toml())
    print(f"# OK: profile {config.profile!r}, {len(config.plugins)} listed plugin(s)", file=sys.stderr)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    config = _load(args)
    by_plugin: dict[str, list[str]] = {}
    for reg in config.registry:
        by_plugin.setdefault(reg.plugin, []).append(f"{reg.kind} {reg.name!r} ({reg.cls.__module__}.{reg.cls.__qualname__})")
    for name, plugin in config.plugin_manager.list_name_plugin():
        hooks = sorted(
            impl.name
            for impl in (h for h in config.plugin_manager.get_hookcallers(plugin) or [])
            if impl.name != "prefork_register_strategies"
        )
        print(name)
        for line in by_plugin.get(name, []):
            print(f"  strategy  {line}")
        for hook in hooks:
            print(f"  hook      {hook}")
    print(f"kinds: {', '.join(KINDS)}")
    return 0


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"prefork {prefork.__version__}")
        parser.exit()


_TRACEBACK_HELP = "on an error, show the full traceback as well as the one-line message"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefork", description="Preforking process pools.")
    parser.add_argument("-V", "--version", action=_Version, help="print prefork's version and exit")
    parser.add_argument("--traceback", action="store_true", help=_TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("run", cmd_run, "start the app the config names"),
        ("serve", cmd_serve, "a prefork server: children accept on mpm.bind and serve a WSGI app over HTTP/1.1 "
                             "(--wsgi) or call app(conn, addr)"),
        ("check", cmd_check, "validate a config and print the merged result"),
        ("plugins", cmd_plugins, "list plugins and the strategies and hooks each provides"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-c", "--config", help="path to a prefork.toml (default: ./prefork.toml if present)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
        if name == "serve":
            p.add_argument("--wsgi", metavar="MODULE:APP",
                           help="serve this WSGI application over HTTP/1.1 (the same as --set mpm.wsgi=MODULE:APP)")
        if name == "run":
            p.add_argument("--progress", choices=("auto", "force", "off"), default="auto",
                           help="a progress bar for an app that declares progress_total: on a terminal (auto), always, never")
        if name in ("run", "serve"):
            p.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                           help="log records at LEVEL and above: DEBUG, INFO, WARNING (default), ERROR or CRITICAL")
            p.add_argument("--log-format", default="text", metavar="FORMAT",
                           help="text (default) or json: one JSON object per line")
        p.set_defaults(func=func)
    from prefork import simulate
    from prefork._control_cli import add_ctl_parser, add_status_parser

    add_status_parser(sub)
    add_ctl_parser(sub)

    text = "run a scaling policy on a fake clock against an arrival trace, forking nothing"
    p = sub.add_parser("simulate", help=text, description=text)
    simulate.add_arguments(p)
    p.set_defaults(func=simulate.run)
    for command in _subcommands(parser):  # `prefork --traceback run` and `prefork run --traceback` alike
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (``prefork ctl NAME stop``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield command
                yield from _subcommands(command)


def _summary(exc: BaseException, full: bool) -> str:
    """One line: the message's first line; for a message that carries a traceback (a
    worker's boot failure), also its last line, the exception.  Where there is more to
    see (the rest of the message, where an OSError came from), it says how."""
    lines = [line.strip() for line in error_text(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[0]
    if len(lines) > 1 and any(line.startswith("Traceback (most recent call last)") for line in lines):
        text += f" {lines[-1]}"
    if (len(lines) > 1 or isinstance(exc, OSError)) and not full:
        text += " (more with --traceback)"
    return text


def _report(exc: BaseException, full: bool) -> None:
    if full:
        traceback.print_exception(exc)
    print(f"prefork: error: {_summary(exc, full)}", file=sys.stderr)


#: bad input: exit code 2 (as for a bad command line); other expected failures: 1
_BAD_INPUT = (ConfigError, PluginError, MissingExtra)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _cwd_importable()
        return int(args.func(args))
    except _AppFailed as failed:  # the app's own exception: as Python shows it
        traceback.print_exception(failed.__cause__ or failed)
        return 1
    except (PreforkError, OSError) as exc:
        _report(exc, args.traceback)
        return 2 if isinstance(exc, _BAD_INPUT) else 1
