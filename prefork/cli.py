"""The ``prefork`` command.

    prefork run [-c prefork.toml] [--set key=value ...]
    prefork serve [-c prefork.toml] [--set key=value ...]
    prefork check [-c prefork.toml] [--set key=value ...]
    prefork plugins [-c prefork.toml]
    prefork simulate [--policy NAME | -c prefork.toml] [--trace FILE.csv | --poisson RATE ...] [--chart out.png]

Without ``-c``, ``./prefork.toml`` is read when it exists.  ``run`` imports the
config's ``app = "module:callable"`` (the current directory is importable),
builds the pool the profile names, calls ``app(pool)`` and shuts the pool down;
SIGINT and SIGTERM stop it promptly (queued tasks are cancelled, running ones
get ``pool.kill_grace`` seconds, then their workers are killed).  The exit code is the app's return value when it is an int.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from prefork import _logging, _progress
from prefork._operate import DERIVED
from prefork._proctitle import set_title
from prefork.config import Config, load_config
from prefork.errors import ConfigError, MissingExtra, PluginError, PreforkError
from prefork.strategies.registry import KINDS
from prefork.strategies.resolver import import_object


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM, so ``finally`` blocks run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
    sys.path.insert(0, os.getcwd())
    try:
        app = import_object(config.app)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"app = {config.app!r}: cannot import it: {exc}") from exc
    if not callable(app):
        raise ConfigError(f"app = {config.app!r}: {type(app).__name__} is not callable")
    bar = _run_bar(config, app, args.progress)

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    set_title(f"{config.name} supervisor")
    try:
        result = runner(config, app, bar)
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
    sys.path.insert(0, os.getcwd())
    try:
        return serve(config, lambda host, port: print(f"prefork serve: listening on {host}:{port}", flush=True))
    except PreforkError as exc:
        raise ConfigError(str(exc)) from exc


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefork", description="Preforking process pools.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, PluginError, MissingExtra) as exc:
        print(f"prefork: error: {exc}", file=sys.stderr)
        return 2
