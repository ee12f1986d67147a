"""prefork: preforking process pools, as easy as concurrent.futures.

Public API only; everything else is private by default.
"""

from __future__ import annotations

import sys as _sys

if not _sys.platform.startswith("linux"):  # before any import that would fail less clearly
    raise ImportError(f"prefork runs on Linux only (it needs pidfd, memfd and prctl); this system is {_sys.platform!r}")

from typing import TYPE_CHECKING, Any

from prefork._hooks import hookimpl
from prefork._task import Task, WorkerInfo
from prefork._worker import WorkerHandle, current_worker
from prefork.config import Config, load_config
from prefork.errors import (
    ConfigError,
    MethodNotFound,
    MissingExtra,
    PluginError,
    PoolBroken,
    PoolShutDown,
    PreforkError,
    QueueFull,
    RemoteTaskError,
    TaskTimeout,
    WorkerLost,
)
from prefork.strategies import (
    Decision,
    MethodResolver,
    Outcome,
    PoolStats,
    ResultSink,
    ScalingPolicy,
    Serializer,
    StrategyRegistry,
    Transport,
)

if TYPE_CHECKING:  # imported on first use (below), so that ``import prefork`` stays quick
    from prefork.bossworker import BossWorker
    from prefork.dispatcher import Dispatcher, XMLRPCFront
    from prefork.executor import Executor
    from prefork.mpm import MPM

    __version__: str

__all__ = [
    "MPM",
    "BossWorker",
    "Config",
    "ConfigError",
    "Decision",
    "Dispatcher",
    "Executor",
    "MethodNotFound",
    "MethodResolver",
    "MissingExtra",
    "Outcome",
    "PluginError",
    "PoolBroken",
    "PoolShutDown",
    "PoolStats",
    "PreforkError",
    "QueueFull",
    "RemoteTaskError",
    "ResultSink",
    "ScalingPolicy",
    "Serializer",
    "StrategyRegistry",
    "Task",
    "TaskTimeout",
    "Transport",
    "WorkerHandle",
    "WorkerInfo",
    "WorkerLost",
    "XMLRPCFront",
    "__version__",
    "current_worker",
    "hookimpl",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name == "Executor":
        from prefork.executor import Executor

        return Executor
    if name in ("Dispatcher", "XMLRPCFront"):
        from prefork import dispatcher

        return getattr(dispatcher, name)
    if name == "BossWorker":
        from prefork.bossworker import BossWorker

        return BossWorker
    if name == "MPM":
        from prefork.mpm import MPM

        return MPM
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("prefork")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module 'prefork' has no attribute {name!r}")
