"""``prefork simulate``'s command line: its options (:func:`add_arguments`,
:func:`build_parser`) and what they mean, a :class:`~prefork.config.Config`
naming the policy (:func:`config_from`) and a :class:`~prefork._trace.Trace`
(:func:`trace_from`), every bad combination refused with one line.  The command
itself, :func:`prefork.simulate.run`, runs the simulation on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Final

from prefork._trace import Burst, Service, Trace, finite_ge0
from prefork.config import Config, load_config
from prefork.errors import ConfigError

__all__ = ["add_arguments", "build_parser", "check_number", "config_from", "trace_from"]

_SYNTHETIC_ONLY: Final = ("service", "duration", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``prefork simulate``'s options, added to ``parser`` (cli.py's subcommand, or :func:`build_parser`)."""
    policy = parser.add_argument_group("the policy (as in prefork.toml's [scaling])")
    policy.add_argument("-c", "--config", help="path to a prefork.toml whose [scaling] to simulate "
                        "(default: ./prefork.toml if present)")
    policy.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set scaling.min_spare=3 (repeatable)")
    policy.add_argument("--policy", metavar="NAME", help="the scaling policy: a registered name (fixed, on-demand, "
                        "spare...) or an import path module:Class; same as --set scaling.name=NAME")
    trace = parser.add_argument_group("the trace (one of)")
    trace.add_argument("--trace", metavar="FILE.csv", help="a CSV of arrival,service rows (seconds)")
    trace.add_argument("--poisson", type=float, metavar="RATE", help="Poisson arrivals, RATE tasks per second")
    trace.add_argument("--diurnal", type=float, metavar="RATE", help="arrivals whose rate swings as a sine around RATE "
                       "tasks per second (see --period, --amplitude)")
    trace.add_argument("--burst", action="append", default=[], metavar="AT:N",
                       help="N tasks arriving at once at AT seconds (repeatable; on top of --poisson or --diurnal)")
    trace.add_argument("--burst-min", type=int, metavar="N",
                       help="--trace: N or more tasks arriving at one instant are a burst (default 2)")
    synthetic = parser.add_argument_group("synthetic traces")
    synthetic.add_argument("--service", metavar="[exp:|const:]SECONDS",
                           help="service time: exp:MEAN (exponential) or const:SECONDS (default exp:0.1)")
    synthetic.add_argument("--duration", type=float, metavar="SECONDS", help="how long arrivals come (default 60)")
    synthetic.add_argument("--period", type=float, metavar="SECONDS", help="--diurnal: one swing of the rate (default: --duration)")
    synthetic.add_argument("--amplitude", type=float, metavar="A", help="--diurnal: the swing, 0 to 1 (default 0.8)")
    synthetic.add_argument("--seed", type=int, metavar="N", help="random seed; same seed, same trace (default 0)")
    run_group = parser.add_argument_group("the run")
    run_group.add_argument("--boot-time", type=float, default=0.05, metavar="SECONDS",
                           help="seconds from fork to a worker ready for tasks (default 0.05)")
    run_group.add_argument("--until", type=float, metavar="SECONDS",
                           help="simulate at least this long (default: the trace's duration)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--chart", metavar="FILE.png", help="draw workers, busy workers and the queue over time "
                     "(needs matplotlib: pip install 'prefork[simulate]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefork simulate",
        description="Run a scaling policy on a fake clock against an arrival trace, forking nothing, "
                    "and report what it would do.",
    )
    add_arguments(parser)
    return parser


def check_number(option: str, value: float | None, *, positive: bool = False) -> None:
    """Refuse ``option``'s ``value`` unless it is None or a finite number >= 0 (> 0 if ``positive``)."""
    if value is not None and not (finite_ge0(value) and (value > 0 or not positive)):
        raise ConfigError(f"{option} {value!r}: must be a finite number {'> 0' if positive else '>= 0'}")


def trace_from(args: argparse.Namespace) -> Trace:
    """The trace the options give: ``--trace``, or a synthetic one (``--poisson``, ``--diurnal``, ``--burst``)."""
    given = [opt for opt, value in (("--trace", args.trace), ("--poisson", args.poisson), ("--diurnal", args.diurnal))
             if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{given[0]} and {given[1]}: give one trace")
    if not given and not args.burst:
        raise ConfigError("no trace: give --trace FILE.csv, --poisson RATE, --diurnal RATE or --burst AT:N")
    if args.diurnal is None:
        for option in ("period", "amplitude"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} {getattr(args, option)!r}: applies to --diurnal only")
    if args.trace is not None:
        for option in (*_SYNTHETIC_ONLY, "burst"):
            if getattr(args, option) not in (None, []):
                raise ConfigError(f"--{option}: applies to synthetic traces, not to --trace {args.trace} "
                                  "(its rows give every arrival and service time)")
        if args.burst_min is not None and args.burst_min < 2:
            raise ConfigError(f"--burst-min {args.burst_min}: must be >= 2")
        return Trace.from_csv(args.trace, burst_min=2 if args.burst_min is None else args.burst_min)
    if args.burst_min is not None:
        raise ConfigError(f"--burst-min {args.burst_min}: applies to --trace only (synthetic bursts are given with --burst)")
    check_number("--poisson", args.poisson)
    check_number("--diurnal", args.diurnal)
    check_number("--duration", args.duration, positive=True)
    check_number("--period", args.period, positive=True)
    if args.amplitude is not None and not (finite_ge0(args.amplitude) and args.amplitude <= 1):
        raise ConfigError(f"--amplitude {args.amplitude!r}: must be between 0 and 1")
    service = Service.parse(args.service) if args.service is not None else Service.exponential(0.1)
    bursts = [Burst.parse(text) for text in args.burst]
    duration = 60.0 if args.duration is None else args.duration
    for b, text in zip(bursts, args.burst, strict=True):
        if b.at > duration:
            raise ConfigError(f"--burst {text}: at {b.at:g} s, past the trace's duration ({duration:g} s; see --duration)")
    seed = 0 if args.seed is None else args.seed
    if args.diurnal is not None:
        return Trace.diurnal(args.diurnal, args.period or duration, duration, service,
                             amplitude=0.8 if args.amplitude is None else args.amplitude, seed=seed, bursts=bursts)
    return Trace.poisson(args.poisson or 0.0, duration, service, seed=seed, bursts=bursts)


def config_from(args: argparse.Namespace) -> Config:
    """The config whose ``[scaling]`` to simulate: ``-c``, ``--set`` and ``--policy``."""
    from prefork.cli import _config_path, _parse_set  # the other commands' -c and --set, read the same way

    overrides = _parse_set(args.set)
    if args.policy is not None:
        named = [key for key in overrides if key in ("scaling", "scaling.name")]
        if named:
            raise ConfigError(f"--policy {args.policy} and --set {named[0]}=...: name the policy once")
        overrides = {"scaling.name": args.policy, **overrides}
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a policy named by import path may live in the current directory
    return load_config(_config_path(args.config), overrides)
