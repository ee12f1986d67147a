"""Every hook prefork calls, grouped by phase.

Hooks are always called with keyword arguments; an implementation may accept
any subset of a hook's arguments, so a hook only ever gains arguments.  Each
docstring says in which process the hook runs.

``worker`` arguments are :class:`prefork.WorkerInfo` objects: ``slot``,
``pid`` (0 before the fork), ``name`` and ``serial``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefork._hooks import hookspec

if TYPE_CHECKING:
    from prefork._task import WorkerInfo
    from prefork.strategies.registry import StrategyRegistry


# -- registration ---------------------------------------------------------------


@hookspec
def prefork_register_strategies(registry: StrategyRegistry) -> None:
    """Register named strategy classes with ``registry.register(kind, cls)``.

    Runs in the process that builds the pool, once per plugin manager.  The
    built-in strategies register through this same hook.

    :param registry: the :class:`prefork.StrategyRegistry` to fill.
    """


# -- forking (in the process that forks: the fork server, or the supervisor) -----


@hookspec
def prefork_before_fork(worker: WorkerInfo) -> None:
    """Called in the forking process just before a worker is forked.

    With ``fork_from = "forkserver"`` (the default) the forking process is the
    pool's fork server, a copy of the caller made when the pool started, except
    for the first worker of a pool started from the main thread: the caller forks
    that one itself, at start.
    """


@hookspec
def prefork_after_fork(worker: WorkerInfo) -> None:
    """Called in the forking process just after a worker was forked (``worker.pid`` is set)."""


# -- in the worker ------------------------------------------------------------------


@hookspec
def prefork_worker_init(worker: WorkerInfo) -> None:
    """Called in the new worker after the fork, before the initializer and any task.

    An exception here is a boot failure: the worker exits and the pool's
    crash-loop guard counts it.
    """


@hookspec
def prefork_before_call(worker: WorkerInfo, task_id: int, method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Called in the worker before each task's callable runs."""


@hookspec
def prefork_after_call(
    worker: WorkerInfo, task_id: int, method: Any, ok: bool, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Called in the worker after each task's callable returned (``ok``) or raised
    (``result`` is then the exception).  ``args``/``kwargs`` are the task's arguments."""


@hookspec
def prefork_worker_exit(worker: WorkerInfo, reason: str) -> None:
    """Called in the worker as it leaves on its own (stop, recycling, EOF)."""


# -- in the supervisor ------------------------------------------------------------


@hookspec
def prefork_child_data(worker: WorkerInfo, data: Any, exitcode: int | None) -> None:
    """Called in the supervisor when a worker sends data with ``yell`` (``exitcode`` None)
    or as it exits with data (``exitcode`` set)."""


@hookspec
def prefork_worker_exited(worker: WorkerInfo, status: int | None, reason: str) -> None:
    """Called in the supervisor once a worker has been reaped; ``status`` is the raw wait status."""


@hookspec
def prefork_log(level: int, message: str) -> None:
    """Called with every log line prefork emits (``level`` as in :mod:`logging`), in the
    process that emits it."""
