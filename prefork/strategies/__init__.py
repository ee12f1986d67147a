"""The five strategy protocols and their built-ins, one module per kind."""

from prefork.strategies.registry import KINDS, StrategyRegistry
from prefork.strategies.resolver import MethodResolver
from prefork.strategies.scaling import Decision, PoolStats, ScalingPolicy
from prefork.strategies.serializer import Serializer
from prefork.strategies.sink import Outcome, ResultSink
from prefork.strategies.transport import ChildChannel, ParentChannel, Transport

__all__ = [
    "KINDS",
    "ChildChannel",
    "Decision",
    "MethodResolver",
    "Outcome",
    "ParentChannel",
    "PoolStats",
    "ResultSink",
    "ScalingPolicy",
    "Serializer",
    "StrategyRegistry",
    "Transport",
]
