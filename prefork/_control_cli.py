"""``prefork status`` and ``prefork ctl``: the command-line side of the control socket.

    prefork status [NAME] [--json] [--watch] [--interval S] [--socket-dir DIR]
    prefork ctl NAME add N | remove N | reload | stop [--graceful]   [--socket-dir DIR]

``prefork.cli.build_parser`` adds both with :func:`add_status_parser` and
:func:`add_ctl_parser`; each sets ``func`` to a function of the parsed
arguments returning the exit code.  A mistake a user can make (no such pool,
several pools and no name, permission) raises ``ConfigError`` with one line.
The scoreboard is drawn by :func:`render_status`, a pure function of a status
snapshot (``prefork._status``) and a width.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import textwrap
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import IO, Any, Final

from prefork.control import _scan, fetch_status, request
from prefork.errors import ConfigError

__all__ = ["add_ctl_parser", "add_status_parser", "cmd_ctl", "cmd_status", "format_duration", "render_status", "watch"]

CLEAR: Final = "\x1b[H\x1b[2J"  #: cursor home, clear the screen: a ``--watch`` frame starts with it
MIN_INTERVAL: Final = 0.1
_ELLIPSIS: Final = "…"

# -- drawing the scoreboard -----------------------------------------------------------------


def _cell_width(ch: str) -> int:
    """Cells ``ch`` may take: two for wide East Asian characters, else one.  Marks that a
    terminal draws over the previous cell count one too: a line cut a little early is
    harmless, one a cell too long wraps the whole table."""
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _width(text: str) -> int:
    """Terminal cells ``text`` takes at most (see ``_cell_width``)."""
    return sum(_cell_width(ch) for ch in text)


def _clean(value: Any) -> str:
    """``value`` as text a terminal shows as it is: control characters (ANSI escapes from a
    method's name, say) become ``?``."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _fit(text: str, width: int, *, keep_end: bool = False) -> str:
    """``text`` cut to ``width`` cells, ``…`` marking the cut (at the start with ``keep_end``)."""
    if _width(text) <= width:
        return text
    if width <= 0:
        return ""
    room = width - 1
    chars = reversed(text) if keep_end else iter(text)
    kept: list[str] = []
    used = 0
    for ch in chars:
        w = _cell_width(ch)
        if used + w > room:
            break
        kept.append(ch)
        used += w
    if keep_end:
        return _ELLIPSIS + "".join(reversed(kept))
    return "".join(kept) + _ELLIPSIS


def _pad(text: str, width: int, align: str) -> str:
    gap = " " * max(0, width - _width(text))
    return gap + text if align == ">" else text + gap


def format_duration(seconds: Any) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h03m``, ``4d07h``; ``-`` for no value."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "-"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _mib(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value / 2**20:.1f}"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else _clean(value)
    return str(value)


def _get(data: Any, key: str, default: Any = None) -> Any:
    return data.get(key, default) if isinstance(data, Mapping) else default


#: the scoreboard's columns: header, how a worker's value is shown, alignment.  METHOD
#: comes last: it takes the width left, and a long name loses its start.
_COLUMNS: Final[tuple[tuple[str, Callable[[Mapping[str, Any]], str], str], ...]] = (
    ("PID", lambda w: _num(w.get("pid")), ">"),
    ("STATE", lambda w: _clean(w.get("state", "?")), "<"),
    ("TASK", lambda w: _num(w.get("task")), ">"),
    ("RUNNING", lambda w: format_duration(w.get("running_for")), ">"),
    ("SERVED", lambda w: _num(w.get("served")), ">"),
    ("RSS MiB", lambda w: _mib(w.get("rss")), ">"),
    ("AGE", lambda w: format_duration(w.get("age")), ">"),
)


#: columns left out, in this order, while METHOD would get fewer than MIN_METHOD cells
_DROP_ORDER: Final = ("RSS MiB", "SERVED", "AGE", "TASK")
MIN_METHOD: Final = 16


def _method_cell(w: Mapping[str, Any]) -> str:
    method = w.get("method")
    if method:
        return _clean(method)
    leaving = w.get("leaving")
    return f"(leaving: {_clean(leaving)})" if leaving else "-"


def _counts(counts: Any, order: tuple[str, ...] = ()) -> str:
    if not isinstance(counts, Mapping) or not counts:
        return "none"
    keys = [k for k in order if k in counts] + sorted(str(k) for k in counts if k not in order)
    return ", ".join(f"{_num(counts[k])} {_clean(k)}" for k in keys)


def _keepalive(totals: Any) -> str:
    """``N keepalive, `` when prefork serve children wait on kept-alive connections (never in a task pool)."""
    n = _get(totals, "keepalive", 0)
    return f"{_num(n)} keepalive, " if n else ""


def _policy_line(policy: Any) -> str:
    if not isinstance(policy, Mapping):
        return "policy: ?"
    options = " ".join(f"{_clean(k)}={_clean(v)}" for k, v in policy.items() if k not in ("name", "max_workers"))
    line = f"policy {_clean(policy.get('name', '?'))}: {options or '(no options)'}"
    if policy.get("max_workers") is not None:
        line += f"; at most {_num(policy['max_workers'])} workers"
    return line


def render_status(snapshot: Mapping[str, Any], width: int) -> str:
    """The scoreboard of a status snapshot as text no wider than ``width`` cells (at least 20):
    a header (pool, policy, totals) and one row per worker."""
    width = max(20, int(width))
    totals = _get(snapshot, "totals", {})
    failed = _get(totals, "failed", {})
    header = [
        f"pool {_clean(_get(snapshot, 'name', '?'))!r} ({_clean(_get(snapshot, 'profile', '?'))}), "
        f"pid {_num(_get(snapshot, 'pid'))}: {_clean(_get(snapshot, 'state', '?'))}, "
        f"up {format_duration(_get(snapshot, 'uptime'))}",
        _policy_line(_get(snapshot, "policy")),
        f"workers: {_num(_get(totals, 'workers', 0))} ({_num(_get(totals, 'busy', 0))} busy, "
        f"{_keepalive(totals)}{_num(_get(totals, 'idle', 0))} idle, {_num(_get(totals, 'booting', 0))} booting), "
        f"{_num(_get(totals, 'stopping', 0))} stopping; {_num(_get(totals, 'spawned', 0))} forked since start",
        f"tasks: {_num(_get(totals, 'queued', 0))} queued, {_num(_get(totals, 'in_flight', 0))} in flight, "
        f"{_num(_get(totals, 'completed', 0))} completed of {_num(_get(totals, 'submitted', 0))} submitted",
        f"failed: {_counts(failed, ('error', 'crash', 'timeout', 'cancelled', 'shutdown'))}",
        f"worker exits: {_counts(_get(totals, 'exits', {}))}",
    ]
    version = _get(snapshot, "version")
    if version != 1:
        header.insert(0, f"(status version {_clean(version)}; this prefork reads version 1: some fields may be missing)")
    lines: list[str] = []
    for line in header:
        lines.extend(textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False) or [""])
    lines.append("")
    workers = [w for w in _get(snapshot, "workers", []) or [] if isinstance(w, Mapping)]
    if not workers:
        lines.append("(no workers)")
    else:
        columns = list(_COLUMNS)
        rows = [[show(w) for _, show, _ in columns] for w in workers]
        widths = [max(_width(head), *(_width(r[i]) for r in rows)) for i, (head, _, _) in enumerate(columns)]
        for dropped in _DROP_ORDER:  # a narrow terminal: the least telling columns go first
            if sum(widths) + 2 * len(widths) + MIN_METHOD <= width:
                break
            i = [head for head, _, _ in columns].index(dropped)
            del columns[i], widths[i]
            for r in rows:
                del r[i]
        method_width = max(1, width - sum(widths) - 2 * len(widths))

        def line_of(cells: list[str], method: str) -> str:
            parts = [_pad(c, widths[i], columns[i][2]) for i, c in enumerate(cells)]
            return ("  ".join(parts) + "  " + _fit(method, method_width, keep_end=True)).rstrip()

        lines.append(line_of([head for head, _, _ in columns], "METHOD"))
        for w, row in zip(workers, rows, strict=True):
            lines.append(line_of(row, _method_cell(w)))
    return "\n".join(_fit(line, width) for line in lines) + "\n"


# -- prefork status ---------------------------------------------------------------------------


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least {MIN_INTERVAL} seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def _one_pool(directory: str | None) -> str:
    """The name of the only running pool; ``ConfigError`` when there is none or several."""
    base, live, stale = _scan(directory)
    if len(live) == 1:
        return live[0].name
    if not live:
        note = ""
        if stale:
            note = (f"; {len(stale)} stale socket(s) there, left by pools that died "
                    f"({', '.join(p.stem for p in stale)}): a new pool of the same name replaces its own")
        raise ConfigError(f"no pool is running (no live control socket in {base}){note}")
    names = ", ".join(f"{p.name} (pid {p.pid})" if p.pid else p.name for p in live)
    raise ConfigError(f"{len(live)} pools are running: {names}; name one: prefork status NAME")


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    out: IO[str],
    interval: float,
    *,
    as_json: bool = False,
    width: Callable[[], int] = _terminal_width,
    sleep: Callable[[float], None] = time.sleep,
    frames: int | None = None,
) -> int:
    """Draw ``fetch()`` every ``interval`` seconds until Ctrl-C (0) or the pool goes away (1).

    Text frames start with ``CLEAR`` (redrawn in place); with ``as_json`` each frame is
    one line of JSON.  ``frames`` stops after that many (for tests)."""
    shown = 0
    try:
        while frames is None or shown < frames:
            began = time.monotonic()
            try:
                snapshot = fetch()
            except ConfigError as exc:
                if not shown:
                    raise
                print(f"prefork status: {exc}", file=sys.stderr)
                return 1
            if as_json:
                out.write(json.dumps(snapshot, separators=(",", ":")) + "\n")
            else:
                stamp = time.strftime("%H:%M:%S")
                out.write(f"{CLEAR}{render_status(snapshot, width())}\n{stamp}, every {interval:g} s; Ctrl-C to quit\n")
            out.flush()
            shown += 1
            if frames is not None and shown >= frames:
                break
            sleep(max(0.0, interval - (time.monotonic() - began)))  # pacing a display, not a wait for an event
    except KeyboardInterrupt:
        if not as_json:
            out.write("\n")
        out.flush()
        return 0
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    directory = args.socket_dir
    name = args.name if args.name is not None else _one_pool(directory)

    def fetch() -> dict[str, Any]:
        return fetch_status(name, directory=directory)

    if args.http:
        return _serve_page(fetch, args.http)
    if args.watch:
        return watch(fetch, sys.stdout, args.interval, as_json=args.json)
    snapshot = fetch()
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        sys.stdout.write(render_status(snapshot, _terminal_width()))
    return 0


def _serve_page(fetch: Any, where: str) -> int:
    """``prefork status NAME --http HOST:PORT``: the page, fed through the control socket."""
    from prefork._status_page import serve_status_page

    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http {where!r}: expected HOST:PORT, for example --http 127.0.0.1:9101")
    try:
        page = serve_status_page(fetch, host, int(port))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--http {where!r}: {exc}") from exc
    print(f"prefork status: serving the status page at {page.url} (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        page.close()
    return 0


def _socket_dir_option(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument(
        "--socket-dir", metavar="DIR", default=default,
        help="the directory of the control sockets (default: $XDG_RUNTIME_DIR/prefork, else /tmp/prefork-$UID)",
    )


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``status`` to ``sub`` (``ArgumentParser.add_subparsers()``); returns its parser."""
    text = "show a running pool's workers and totals (its control socket)"
    p = sub.add_parser("status", help=text, description=text)
    p.add_argument("name", nargs="?", metavar="NAME", help="the pool's name (default: the only pool running)")
    p.add_argument("--json", action="store_true", help="print the status snapshot as JSON")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="S", help="seconds between two frames of --watch (default 2)")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the live status page at http://HOST:PORT/ until Ctrl-C "
                   "(keep HOST a loopback address: the page shows the pool to whoever reaches it)")
    _socket_dir_option(p)
    p.set_defaults(func=cmd_status)
    return p


# -- prefork ctl ------------------------------------------------------------------------------


def cmd_ctl(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    if args.action in ("add", "remove"):
        fields["n"] = args.n
    elif args.action == "stop":
        fields["graceful"] = args.graceful
    answer = request(args.name, args.action, directory=args.socket_dir, **fields)
    print(_clean(answer.get("message") or f"pool {args.name!r}: {args.action}: done"))
    return 0


def add_ctl_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``ctl`` to ``sub`` (``ArgumentParser.add_subparsers()``); returns its parser."""
    text = "act on a running pool: add or remove workers, reload them, stop it"
    p = sub.add_parser("ctl", help=text, description=text)
    p.add_argument("name", metavar="NAME", help="the pool's name (see prefork status)")
    _socket_dir_option(p)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="N more workers (as the scaling policy counts them)")
    add.add_argument("n", type=_count, metavar="N")
    remove = actions.add_parser("remove", help="N fewer workers; idle ones leave first")
    remove.add_argument("n", type=_count, metavar="N")
    reload = actions.add_parser("reload", help="replace every worker once it is idle (new code, fresh memory)")
    upgrade = actions.add_parser("upgrade", help="prefork serve: start a new master on the same socket; this one "
                                 "drains once it is ready (as SIGUSR2)")
    stop = actions.add_parser("stop", help="stop the pool: cancel queued tasks, kill running ones after pool.kill_grace")
    stop.add_argument("--graceful", action="store_true", help="let queued and running tasks finish first")
    for action in (add, remove, reload, upgrade, stop):  # also after the action; SUPPRESS keeps a value given before it
        _socket_dir_option(action, default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ctl)
    return p
