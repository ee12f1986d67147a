"""Progress bars: the ``progress=`` argument of every facade, drawn with tqdm.

::

    any thread: the supervisor's (done-callbacks,          the bar's own thread
    sink deliveries), or the caller's                       ("prefork-progress")
    ─────────────────────────────────────────────          ──────────────────────────────
    Progress.follow(future, n)  ─┐                          every INTERVAL: bar.update(new)
    Progress.done(n)            ─┼─► two ints, one lock ──► and bar.total = posted (a pool)
    Progress.post(n)            ─┘   (no I/O)               on close: the last update, then
                                                            bar.close() if the bar is ours

The counts change in the supervisor's thread, which must never wait on a
terminal: a paused terminal (Ctrl-S) or a pipe nobody reads would stall every
worker's results, timeouts and deaths.  The caller's thread cannot draw
either: it sits in ``future.result()`` exactly when the bar matters (a slow
item), and the bar would freeze.  So each bar gets a thread of its own, the
only one that touches the bar after it was made: it is updated and closed by
one thread, once, whatever the caller does meanwhile (breaks out of a loop,
gets an exception, presses Ctrl-C twice).

What ``progress=`` accepts (:func:`check`), for every facade alike:

- ``False`` / ``None``: no bar (the default; nothing is imported or counted).
- ``True``: a tqdm bar on ``sys.stderr`` if it is a terminal, else none.
- ``"force"``: a tqdm bar on ``sys.stderr`` even when it is not a terminal.
- a bar: any object with ``update(n)``, a ``tqdm`` you made, say.  It is the
  caller's: it is updated (from the bar thread), never closed, its total never set.
- a bar factory: a class or callable such as ``tqdm.tqdm``,
  ``tqdm.notebook.tqdm`` or ``functools.partial(tqdm.tqdm, desc="resize")``,
  called as ``factory(total=n)`` (``None`` when unknown); the bar it returns
  (with ``update(n)`` and ``close()``) is prefork's, closed once.

Anything else is a ``TypeError`` naming the argument and the value.
``True`` and ``"force"`` need tqdm (``pip install 'prefork[progress]'``);
without it they raise :class:`MissingExtra` (an ``ImportError``), on a pipe too,
so a script does not work in CI and fail on a terminal.
"""

from __future__ import annotations

import importlib
import logging
import reprlib
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence, Sized
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from typing import IO, Any, Final, Protocol, TypeAlias, TypeVar

from prefork._threads import join_thread
from prefork.errors import MissingExtra

__all__ = ["FORCE", "Bar", "MissingExtra", "Progress", "ProgressArg", "bar_for_run", "check", "declared_total", "sized_total"]

log = logging.getLogger("prefork.progress")
T = TypeVar("T")

#: the value of ``progress=`` that draws a bar even when stderr is not a terminal
FORCE: Final = "force"
#: seconds between two looks at the counts by a bar's thread
INTERVAL: Final = 0.1
#: seconds without news after which a bar of ours is redrawn anyway (its elapsed time moves)
IDLE_REDRAW: Final = 1.0

# Bars are drawn under one lock: a bar of the caller's may serve two maps at once
# (two threads), and tqdm's update() is not safe from two threads.
_DRAWING = threading.Lock()

_ACCEPTED = (
    "give True (a bar when stderr is a terminal), 'force', False, a bar (an object with update(n)) "
    "or a bar factory (a callable such as tqdm.tqdm)"
)


class Bar(Protocol):
    """What prefork needs of a bar: tqdm's ``update`` and ``close``."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> object: ...


#: what ``progress=`` may be (see the module text); checked at run time by :func:`check`
ProgressArg: TypeAlias = "bool | str | Bar | Callable[..., Any] | None"


def _tqdm_class(what: str) -> Any:
    """tqdm's bar class; ``what`` needs it (the start of the error's one line)."""
    try:
        module = importlib.import_module("tqdm")
    except ImportError as exc:
        error = MissingExtra(f"{what} needs tqdm, which is not installed: pip install 'prefork[progress]'", name="tqdm")
        if exc.name == "tqdm":
            raise error from None  # one line: the module is simply not there
        raise error from exc  # tqdm is there but broken: show why
    global _bar_class
    if _bar_class is None or _bar_class.__base__ is not module.tqdm:
        # Without tqdm's monitor thread, which the first bar would start and nothing stops:
        # every pool started after it would fork a process with threads.  Progress redraws
        # a stalled bar itself.
        _bar_class = type("tqdm", (module.tqdm,), {"monitor_interval": 0, "__module__": __name__})
    return _bar_class


_bar_class: Any = None  #: tqdm's bar class without its monitor thread (made on first use)


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # None (pythonw), closed, or no isatty
        return False


def check(progress: object, where: str) -> Spec | None:
    """Validate ``progress=`` (see the module text) where it is given: the bar
    to make later, or ``None`` for no bar.  ``True`` decides on the terminal now.

    :raises TypeError: for a value that is none of the accepted ones.
    :raises MissingExtra: ``True`` or ``"force"`` without tqdm installed.
    """
    if progress is None or progress is False:
        return None
    if progress is True or (isinstance(progress, str) and progress == FORCE):
        tqdm = _tqdm_class(f"{where}: progress={progress!r}")
        stream = sys.stderr
        if progress is True and not _is_terminal(stream):
            return None
        return Spec(where, tqdm, stream=stream)
    if isinstance(progress, Mapping):  # options for tqdm, as some libraries take them: a dict has update() too
        raise TypeError(
            f"{where}: progress={reprlib.repr(progress)} is not accepted; for tqdm's options give a factory, "
            f"functools.partial(tqdm.tqdm, ...); {_ACCEPTED}"
        )
    if isinstance(progress, (str, bytes, int, float, AbstractSet, Sequence)):  # a typo, 1 for True, a set (update())
        raise TypeError(f"{where}: progress={reprlib.repr(progress)} is not accepted; {_ACCEPTED}")
    if not isinstance(progress, type) and callable(getattr(progress, "update", None)):
        return Spec(where, progress, owned=False)
    if callable(progress):
        return Spec(where, progress)
    raise TypeError(f"{where}: progress={reprlib.repr(progress)} ({type(progress).__name__}) is not accepted; {_ACCEPTED}")


class Spec:
    """A checked ``progress=``: makes the :class:`Progress` of one map or one pool."""

    __slots__ = ("_make", "_owned", "_stream", "_where")

    def __init__(self, where: str, make: Any, *, owned: bool = True, stream: IO[str] | None = None) -> None:
        self._where = where
        self._make = make  # a factory (owned), or the caller's bar itself
        self._owned = owned
        self._stream = stream  # set for prefork's own tqdm bar (True, "force")

    def start(self, total: int | None, *, grows: bool = False, unit: str = "it") -> Progress:
        """The bar of ``total`` steps (``None``: unknown); with ``grows`` the total
        is what was posted so far, and rises with :meth:`Progress.post`."""
        if not self._owned:
            return Progress(self._make, owned=False, total=total, grows=grows)
        if self._stream is not None:
            bar = self._make(total=total, file=self._stream, unit=unit, dynamic_ncols=True)
            return Progress(bar, owned=True, total=total, grows=grows, idle_redraw=_is_terminal(self._stream))
        bar = self._make(total=total)
        if not (callable(getattr(bar, "update", None)) and callable(getattr(bar, "close", None))):
            raise TypeError(
                f"{self._where}: progress={reprlib.repr(self._make)} returned {reprlib.repr(bar)}, "
                "which has no update(n) and close(); a bar factory must return a bar such as tqdm's"
            )
        return Progress(bar, owned=True, total=total, grows=grows)

    def start_for_pool(self, owner: object, sup: Any, unit: str) -> Progress:
        """A facade's bar of the jobs it was given, started after the pool's forks (its
        thread would otherwise be forked with them: docs/reliability.md, "Forking and
        threads"); a bar that cannot start stops the pool; closed when ``owner`` is dropped."""
        try:
            bar = self.start(0, grows=True, unit=unit)
        except BaseException:
            sup.shutdown(force=True)
            raise
        weakref.finalize(owner, bar.close)
        return bar


class Progress:
    """Counts for one bar, drawn by a thread of its own (see the module text).

    ``done(n)``, ``post(n)`` and ``follow(future, n)`` may be called from any
    thread and do no I/O; :meth:`close` may be called any number of times from
    any thread.
    """

    __slots__ = (
        "_bar", "_done", "_drawn", "_grows", "_idle_redraw", "_lock", "_owned", "_shown_total", "_stop", "_thread",
        "_total", "_until", "_weights",
    )

    def __init__(
        self, bar: Any, *, owned: bool, total: int | None, grows: bool = False, idle_redraw: bool = False
    ) -> None:
        """``idle_redraw``: redraw after IDLE_REDRAW s without news, so that the elapsed
        time moves (on a terminal only: in a log each redraw would be one more line)."""
        self._bar = bar
        self._owned = owned
        self._grows = grows
        self._idle_redraw = idle_redraw
        self._lock = threading.Lock()
        self._done = 0  # finished so far
        self._total = (total or 0) if grows else total
        self._weights: dict[Future[Any], int] = {}  # followed futures not yet counted
        self._drawn = 0
        self._shown_total = self._total
        self._until: Callable[[], bool] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefork-progress", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # no thread (a resource limit, Ctrl-C): the bar is closed all the same
            if owned:
                bar.close()
            raise

    # -- counting: any thread, no I/O -------------------------------------------------------

    def done(self, n: int = 1) -> None:
        """``n`` more steps finished."""
        with self._lock:
            self._done += n

    def post(self, n: int = 1) -> None:
        """``n`` more steps to do (a pool's bar, whose total grows); negative to take some back."""
        with self._lock:
            self._total = (self._total or 0) + n

    def follow(self, fut: Future[Any], n: int = 1) -> None:
        """Count ``n`` steps when ``fut`` finishes, with a result or an error (not when
        cancelled); a growing bar's total rises by ``n`` now."""
        with self._lock:
            if self._grows:
                self._total = (self._total or 0) + n
            self._weights[fut] = n
        fut.add_done_callback(self._settled)

    def _settled(self, fut: Future[Any]) -> None:
        with self._lock:
            n = self._weights.pop(fut, 0)
            if n and not fut.cancelled():
                self._done += n

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Draw the final count and close the bar (if it is prefork's); wait for that."""
        self._sweep()
        self._stop.set()
        if self._thread is not threading.current_thread():
            join_thread(self._thread)  # gone from the kernel too: a pool may fork at once

    def close_when(self, over: Callable[[], bool]) -> None:
        """Close once ``over()`` is true (a pool shut down without waiting: its bar
        goes on counting until the pool has stopped); returns at once.  A later
        :meth:`close` closes at once."""
        self._until = over

    def _sweep(self) -> None:
        # A future's done-callbacks run after its outcome is set, in the supervisor's
        # thread: the caller may have taken the result (the last one of a map, say)
        # before the callback counted it.  Count here what is done and not counted yet.
        with self._lock:
            for fut, n in self._weights.items():
                if fut.done() and not fut.cancelled():
                    self._done += n
            self._weights.clear()

    # -- the bar's thread -------------------------------------------------------------------

    def _run(self) -> None:
        quiet_since = time.monotonic()
        try:
            while not self._stop.wait(INTERVAL):
                over = self._until
                if over is not None and over():
                    self._sweep()
                    break
                if self._draw():
                    quiet_since = time.monotonic()
                elif self._idle_redraw and time.monotonic() - quiet_since >= IDLE_REDRAW:
                    self._refresh()  # nothing new, but the elapsed time moves on
                    quiet_since = time.monotonic()
            self._draw()
        except BaseException:
            log.exception("progress bar %r failed; it is no longer updated", self._bar)
        finally:
            self._weights.clear()
            if self._owned:
                try:
                    with _DRAWING:
                        self._bar.close()
                except BaseException:
                    log.exception("progress bar %r failed to close", self._bar)

    def _draw(self) -> bool:
        """Hand the bar what changed since the last look; True when something did."""
        with self._lock:
            done, total = self._done, self._total
        changed = False
        if self._grows and self._owned and total != self._shown_total:
            with _DRAWING:
                self._bar.total = total
            self._shown_total = total
            changed = True
            if done == self._drawn:
                self._refresh()
        if done != self._drawn:
            with _DRAWING:
                self._bar.update(done - self._drawn)
            self._drawn = done
            changed = True
        return changed

    def _refresh(self) -> None:
        refresh = getattr(self._bar, "refresh", None)
        if callable(refresh):
            with _DRAWING:
                refresh()


# -- helpers for the facades and for `prefork run` ------------------------------------------------


def sized_total(iterables: Iterable[Iterable[Any]]) -> int | None:
    """The length of a ``zip`` over ``iterables`` if each one has a length, else ``None``."""
    total: int | None = None
    for it in iterables:
        if not isinstance(it, Sized):
            return None
        total = len(it) if total is None else min(total, len(it))
    return total


def closing(results: Iterator[T], progress: Progress) -> Generator[T, None, None]:
    """``results``, closing ``progress`` once they end: exhausted, raised, closed or dropped."""
    try:
        yield from results
    finally:
        progress.close()


def bar_for_run(total: int | None, stream: IO[str] | None = None, *, force: bool = False) -> Bar | None:
    """The bar ``prefork run`` shows for an app that declares its total (see
    :func:`declared_total`): a tqdm bar of ``total`` steps on ``stream`` (default
    ``sys.stderr``) when it is a terminal or ``force``, else ``None``.

    Give it to the pool as ``progress=bar`` (each finished task, job, request or
    map item is one step) and ``close()`` it once the pool has shut down.  The app
    did not ask for a bar itself, so tqdm is only needed when one is drawn.

    :raises MissingExtra: a bar is to be drawn and tqdm is not installed.
    """
    stream = sys.stderr if stream is None else stream
    if not force and not _is_terminal(stream):
        return None
    tqdm = _tqdm_class("prefork run: the progress bar")
    bar: Bar = tqdm(total=total, file=stream, unit="task", dynamic_ncols=True)
    return bar


def declared_total(app: object) -> int | None:
    """The total an app declares for ``prefork run``'s bar: its ``progress_total``
    attribute, an int >= 0 or a callable returning one (called once, now); ``None``
    when it declares none (or its callable returns ``None``).

    :raises TypeError: ``progress_total`` is something else (the message names the app and the value).
    """
    value = getattr(app, "progress_total", None)
    if callable(value):
        value = value()
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        name = getattr(app, "__qualname__", type(app).__name__)
        raise TypeError(f"app {name}: progress_total = {reprlib.repr(value)}: must be an int >= 0, or a callable returning one")
    return value
