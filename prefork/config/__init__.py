"""prefork's configuration: ``prefork.toml``, packaged profiles and keyword arguments.

:func:`load_config` layers a packaged profile, the user's file and keyword
arguments into one validated, frozen :class:`Config`.  ``python -m
prefork.config.reference`` prints every setting.
"""

from prefork.config.load import load_config, load_facade_config, profile_names
from prefork.config.model import BossWorkerConfig, Config, PoolConfig, StrategySpec

__all__ = ["BossWorkerConfig", "Config", "PoolConfig", "StrategySpec", "load_config", "load_facade_config", "profile_names"]
