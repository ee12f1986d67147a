"""The tasks ``prefork simulate`` runs, and the value checks it shares.

A :class:`Trace` says when each task arrives and how long it runs.  It is read
from a CSV file (:meth:`Trace.from_csv`), given as rows, or made synthetic:
Poisson or diurnal arrivals (:meth:`Trace.poisson`, :meth:`Trace.diurnal`) with
:class:`Service` times, plus :class:`Burst` arrivals on top.  Public through
:mod:`prefork.simulate`, which re-exports these classes.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

import attrs

from prefork.errors import ConfigError

__all__ = ["Burst", "Service", "Trace", "check", "finite_ge0"]

_COLUMNS: Final = ("arrival", "service")


def finite_ge0(value: float) -> bool:
    """A finite int or float (not a bool) >= 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check(ok: bool, what: str, value: object, reason: str) -> None:
    """A :class:`ConfigError` ``what = value: reason`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{what} = {value!r}: {reason}")


@attrs.frozen
class Service:
    """How long a synthetic task runs: ``constant`` seconds, or ``exponential`` with that mean."""

    kind: Literal["constant", "exponential"]
    mean: float  #: seconds

    def __attrs_post_init__(self) -> None:
        check(self.kind in ("constant", "exponential"), "service kind", self.kind, "must be 'constant' or 'exponential'")
        check(finite_ge0(self.mean), "service time", self.mean, "must be a finite number of seconds >= 0")

    @classmethod
    def constant(cls, seconds: float) -> Service:
        return cls("constant", seconds)

    @classmethod
    def exponential(cls, mean: float) -> Service:
        return cls("exponential", mean)

    @classmethod
    def parse(cls, text: str) -> Service:
        """``0.2`` or ``const:0.2`` (constant), ``exp:0.2`` (exponential, mean 0.2 s)."""
        kind, _, number = text.strip().rpartition(":")
        kinds = {"": "constant", "const": "constant", "constant": "constant", "exp": "exponential", "exponential": "exponential"}
        if kind not in kinds:
            raise ConfigError(f"--service {text!r}: expected SECONDS, const:SECONDS or exp:MEAN, for example exp:0.1")
        try:
            seconds = float(number)
        except ValueError:
            raise ConfigError(f"--service {text!r}: {number!r} is not a number of seconds") from None
        if not finite_ge0(seconds):
            raise ConfigError(f"--service {text!r}: the time must be a finite number of seconds >= 0")
        return cls(kinds[kind], seconds)  # type: ignore[arg-type]

    def draw(self, rng: random.Random) -> float:
        if self.kind == "constant" or self.mean == 0:
            return self.mean
        return rng.expovariate(1.0 / self.mean)

    def __str__(self) -> str:
        return f"{'exp' if self.kind == 'exponential' else 'const'}:{self.mean:g}"


@attrs.frozen
class Burst:
    """``tasks`` tasks arriving at once at ``at`` seconds."""

    at: float
    tasks: int

    def __attrs_post_init__(self) -> None:
        check(finite_ge0(self.at), "burst time", self.at, "must be a finite number of seconds >= 0")
        check(isinstance(self.tasks, int) and not isinstance(self.tasks, bool) and self.tasks >= 1,
              "burst size", self.tasks, "must be an integer >= 1")

    @classmethod
    def parse(cls, text: str) -> Burst:
        """``AT:N``: N tasks at AT seconds."""
        at, _, n = text.partition(":")
        try:
            at_s, tasks = float(at), int(n)
        except ValueError:
            raise ConfigError(f"--burst {text!r}: expected AT:N (N tasks arriving at once at AT seconds), for example 10:50") from None
        try:
            return cls(at_s, tasks)
        except ConfigError as exc:
            raise ConfigError(f"--burst {text!r}: {exc}") from None


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(values)


def _burst_tuple(values: Iterable[Burst]) -> tuple[Burst, ...]:
    return tuple(values)


def _check_trace(instance: Trace, attribute: Any, value: Any) -> None:
    arrivals, services = instance.arrivals, instance.services
    if len(arrivals) != len(services):
        raise ConfigError(f"trace {instance.source}: {len(arrivals)} arrival times but {len(services)} service times")
    previous = 0.0
    for i, (a, s) in enumerate(zip(arrivals, services, strict=True)):
        check(finite_ge0(a), f"trace {instance.source}: task {i} arrival", a, "must be a finite number of seconds >= 0")
        check(finite_ge0(s), f"trace {instance.source}: task {i} service", s, "must be a finite number of seconds >= 0")
        check(a >= previous, f"trace {instance.source}: task {i} arrival", a, "arrivals must be in order")
        previous = a


@attrs.frozen
class Trace:
    """Tasks to simulate: task ``i`` arrives ``arrivals[i]`` seconds after the pool
    starts and runs ``services[i]`` seconds.  ``duration`` is how long the trace
    lasts (the simulation runs at least that long); each of ``bursts`` is reported
    on (the time the pool takes to absorb it).  Build one with the classmethods."""

    arrivals: tuple[float, ...] = attrs.field(converter=_floats, validator=_check_trace)
    services: tuple[float, ...] = attrs.field(converter=_floats)
    duration: float
    bursts: tuple[Burst, ...] = attrs.field(default=(), converter=_burst_tuple)
    source: str = "trace"  #: where it came from, for the report

    def __attrs_post_init__(self) -> None:
        check(finite_ge0(self.duration), f"trace {self.source}: duration", self.duration,
              "must be a finite number of seconds >= 0")

    def __len__(self) -> int:
        return len(self.arrivals)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, float]], *, duration: float | None = None,
                  bursts: Iterable[Burst] = (), source: str = "rows") -> Trace:
        """From ``(arrival, service)`` pairs in any order (sorted by arrival, stable);
        ``duration`` defaults to the last arrival."""
        pairs = sorted(((float(a), float(s)) for a, s in rows), key=lambda p: p[0])
        if duration is None:
            duration = pairs[-1][0] if pairs else 0.0
        return cls(tuple(a for a, _ in pairs), tuple(s for _, s in pairs), duration, tuple(bursts), source)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str], *, burst_min: int = 2) -> Trace:
        """Read ``arrival,service`` rows (seconds from the pool's start; the header line
        ``arrival,service`` is optional; blank lines are skipped; rows may come in any
        order).  An instant at which ``burst_min`` or more tasks arrive is a burst.  A bad
        row raises a :class:`ConfigError` naming the file, line and column."""
        name = os.fsdecode(path)
        check(isinstance(burst_min, int) and burst_min >= 2, "burst_min", burst_min, "must be an integer >= 2")
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read the trace: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        rows: list[tuple[float, float]] = []
        reader = csv.reader(text.splitlines(), strict=True)
        first = True
        try:
            for fields in reader:
                line = reader.line_num
                if all(not f.strip() for f in fields):
                    continue
                if len(fields) != 2:
                    raise ConfigError(f"{name}:{line}: column {min(len(fields) + 1, 3)}: expected 2 columns, "
                                      f"arrival,service (seconds); this row has {len(fields)}")
                if first and not _is_number(fields[0]):
                    first = False
                    header = [f.strip().lower() for f in fields]
                    for col, (got, want) in enumerate(zip(header, _COLUMNS, strict=True), 1):
                        if got != want:
                            raise ConfigError(f"{name}:{line}: column {col}: {fields[col - 1].strip()!r}: "
                                              "expected a number, or the header arrival,service")
                    continue
                first = False
                values = []
                for col, (field, what) in enumerate(zip(fields, _COLUMNS, strict=True), 1):
                    try:
                        value = float(field)
                    except ValueError:
                        raise ConfigError(f"{name}:{line}: column {col} ({what}): {field.strip()!r} is not a number") from None
                    if not finite_ge0(value):
                        raise ConfigError(f"{name}:{line}: column {col} ({what}): {field.strip()!r}: "
                                          "must be a finite number of seconds >= 0")
                    values.append(value)
                rows.append((values[0], values[1]))
        except csv.Error as exc:
            raise ConfigError(f"{name}:{reader.line_num}: not valid CSV: {exc}") from None
        trace = cls.from_rows(rows, source=name)
        return attrs.evolve(trace, bursts=_bursts_in(trace.arrivals, burst_min))

    @classmethod
    def poisson(cls, rate: float, duration: float, service: Service, *, seed: int = 0,
                bursts: Iterable[Burst] = ()) -> Trace:
        """Arrivals at ``rate`` per second (a Poisson process) for ``duration`` seconds,
        plus ``bursts``; services drawn from ``service``.  Same seed, same trace."""
        check(finite_ge0(rate), "rate", rate, "must be a finite number of tasks per second >= 0")
        check(finite_ge0(duration) and duration > 0, "duration", duration, "must be a finite number of seconds > 0")
        rng = random.Random(seed)
        times: list[float] = []
        t = 0.0
        if rate > 0:
            while True:
                t += rng.expovariate(rate)
                if t >= duration:
                    break
                times.append(t)
        base = f"poisson {rate:g}/s" if rate > 0 else "no base rate"
        source = f"{base} for {duration:g} s, service {service}, seed {seed}"
        return cls._build(times, service, rng, tuple(bursts), duration, source)

    @classmethod
    def diurnal(cls, mean_rate: float, period: float, duration: float, service: Service, *, amplitude: float = 0.8,
                seed: int = 0, bursts: Iterable[Burst] = ()) -> Trace:
        """Arrivals whose rate swings as a sine around ``mean_rate`` per second:
        ``mean_rate * (1 + amplitude * sin(2 pi t / period))``, lowest at ``0.75 * period``
        and highest at ``0.25 * period``; plus ``bursts``."""
        check(finite_ge0(mean_rate), "rate", mean_rate, "must be a finite number of tasks per second >= 0")
        check(finite_ge0(period) and period > 0, "period", period, "must be a finite number of seconds > 0")
        check(finite_ge0(duration) and duration > 0, "duration", duration, "must be a finite number of seconds > 0")
        check(finite_ge0(amplitude) and amplitude <= 1, "amplitude", amplitude, "must be between 0 and 1")
        rng = random.Random(seed)
        times: list[float] = []
        peak = mean_rate * (1 + amplitude)
        t = 0.0
        if peak > 0:
            while True:  # thinning: candidates at the peak rate, each kept with probability rate(t) / peak
                t += rng.expovariate(peak)
                if t >= duration:
                    break
                if rng.random() * peak < mean_rate * (1 + amplitude * math.sin(2 * math.pi * t / period)):
                    times.append(t)
        source = (f"diurnal {mean_rate:g}/s +-{amplitude:g} over {period:g} s for {duration:g} s, "
                  f"service {service}, seed {seed}")
        return cls._build(times, service, rng, tuple(bursts), duration, source)

    @classmethod
    def _build(cls, times: list[float], service: Service, rng: random.Random, bursts: tuple[Burst, ...],
               duration: float, source: str) -> Trace:
        for b in bursts:
            check(b.at <= duration, "burst time", b.at, f"is past the trace's duration ({duration:g} s)")
        rows = [(t, service.draw(rng)) for t in times]
        for b in bursts:
            rows.extend((b.at, service.draw(rng)) for _ in range(b.tasks))
        if bursts:
            source += ", bursts " + " ".join(f"{b.tasks}@{b.at:g}s" for b in bursts)
        return cls.from_rows(rows, duration=duration, bursts=sorted(bursts, key=lambda b: b.at), source=source)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bursts_in(arrivals: Sequence[float], minimum: int) -> tuple[Burst, ...]:
    found: list[Burst] = []
    i = 0
    while i < len(arrivals):
        j = i
        while j < len(arrivals) and arrivals[j] == arrivals[i]:
            j += 1
        if j - i >= minimum:
            found.append(Burst(arrivals[i], j - i))
        i = j
    return tuple(found)
