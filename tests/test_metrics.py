"""prefork.metrics: a real pool scraped over HTTP and read back with prometheus_client's
own parser; the families built from any snapshot (Hypothesis); snapshots refused with
the field they lack; the endpoint's life (port 0, close, a port in use); and the one
error a user without the extra meets."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from prefork import TaskTimeout, WorkerLost
from prefork._status import BUCKETS, EXIT_CAUSES, FAILURE_KINDS, STATUS_VERSION
from prefork._supervisor import Supervisor
from prefork.config import load_config
from prefork.metrics import METRICS, PoolCollector, metric_families, serve_metrics
from prefork.testing import wait_until

WAIT = 20.0


def napping(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fails() -> None:
    raise ValueError("no")


def dies() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def start(workers: int, timing: bool = True) -> Supervisor:
    sup = Supervisor(load_config(None, {"name": "scraped", "scaling.name": "fixed", "scaling.workers": workers}))
    sup.tally.timing = timing  # what a pool serving metrics does
    sup.start()
    return sup


@pytest.fixture
def pool() -> Iterator[Supervisor]:
    sup = start(2)
    try:
        yield sup
    finally:
        sup.shutdown()


@pytest.fixture
def one_worker() -> Iterator[Supervisor]:
    sup = start(1)
    try:
        yield sup
    finally:
        sup.shutdown()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[dict[str, Metric], Samples]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"pool": "scraped", **labels}.items()))]


def bucket_series(family: Metric, pool: str = "scraped") -> list[tuple[float, float]]:
    """``(le, cumulative count)`` of a histogram's buckets, in the order exposed."""
    return [(float(s.labels["le"]), s.value) for s in family.samples
            if s.name.endswith("_bucket") and s.labels["pool"] == pool]


# -- a real pool, scraped --------------------------------------------------------------------------------


def test_a_scrape_counts_what_the_pool_did(pool: Supervisor) -> None:
    naps = [pool.submit(napping, (0.01,)) for _ in range(6)]
    assert [f.result(WAIT) for f in naps] == [0.01] * 6
    assert isinstance(pool.submit(fails).exception(WAIT), ValueError)
    assert isinstance(pool.submit(dies).exception(WAIT), WorkerLost)
    assert isinstance(pool.submit(napping, (30.0,), timeout=0.3).exception(WAIT), TaskTimeout)
    # the two lost workers replaced and idle again
    wait_until(lambda: (t := pool.status()["totals"])["idle"] == 2 and t["spawned"] == 4, WAIT, what="replacements")
    slots = {str(w["slot"]) for w in pool.status()["workers"]}
    with serve_metrics(pool.status, 0) as server:
        families, samples = scrape(server.url)

    assert value(samples, "prefork_tasks_submitted_total") == 9
    assert value(samples, "prefork_tasks_completed_total") == 6
    assert {k: value(samples, "prefork_tasks_failed_total", kind=k) for k in FAILURE_KINDS} == {
        "error": 1, "crash": 1, "timeout": 1, "cancelled": 0, "shutdown": 0}
    exits = {c: value(samples, "prefork_worker_exits_total", cause=c) for c in EXIT_CAUSES}
    assert exits == {c: (1 if c in ("crash", "timeout") else 0) for c in EXIT_CAUSES}
    assert value(samples, "prefork_workers_spawned_total") == 4
    assert value(samples, "prefork_tasks_taken_back_total") == 0  # one task at a time: nothing prefetched
    assert {s: value(samples, "prefork_workers", state=s) for s in ("booting", "idle", "busy", "stopping")} == {
        "booting": 0, "idle": 2, "busy": 0, "stopping": 0}
    assert value(samples, "prefork_workers_max") == 2
    assert value(samples, "prefork_queue_depth") == 0 and value(samples, "prefork_tasks_in_flight") == 0
    rss = {dict(labels)["slot"]: v for (name, labels), v in samples.items() if name == "prefork_worker_rss_bytes"}
    assert set(rss) == slots and len(slots) == 2 and min(rss.values()) > 1_000_000
    assert value(samples, "prefork_pool_state", state="running") == 1
    assert value(samples, "prefork_pool_state", state="broken") == 0
    # the counters' types survive the text format; every sample names its pool
    assert {n: families[n].type for n in ("prefork_tasks_failed", "prefork_worker_exits")} == {
        "prefork_tasks_failed": "counter", "prefork_worker_exits": "counter"}
    assert all(labels and dict(labels)["pool"] == "scraped" for _, labels in samples)
    # six naps and one error ran to an end: at least those are in both histograms
    for name in ("prefork_task_run_seconds", "prefork_task_queue_wait_seconds"):
        assert families[name].type == "histogram"
        assert value(samples, f"{name}_count") >= 7
        assert bucket_series(families[name])[-1] == (math.inf, value(samples, f"{name}_count"))


def test_the_histograms_count_each_task_in_cumulative_buckets_ending_at_inf(one_worker: Supervisor) -> None:
    pool = one_worker  # the naps queue behind each other
    naps = [pool.submit(napping, (0.03,)) for _ in range(5)]
    for f in naps:
        f.result(WAIT)
    with serve_metrics(pool.status, 0) as server:
        families, samples = scrape(server.url)
    run = bucket_series(families["prefork_task_run_seconds"])
    wait = bucket_series(families["prefork_task_queue_wait_seconds"])
    for series in (run, wait):
        assert [le for le, _ in series] == [*BUCKETS, math.inf]
        counts = [c for _, c in series]
        assert counts == sorted(counts), f"buckets not cumulative: {series}"
    assert value(samples, "prefork_task_run_seconds_count") == 5 == run[-1][1]
    assert dict(run)[0.025] == 0  # a 30 ms nap never runs for less than 25 ms
    assert 0.15 <= value(samples, "prefork_task_run_seconds_sum") < 5.0
    assert value(samples, "prefork_task_queue_wait_seconds_count") == 5
    assert value(samples, "prefork_task_queue_wait_seconds_sum") >= 0.03 * (1 + 2 + 3 + 4) * 0.9  # they queued


def test_without_timing_the_histograms_are_left_out_and_the_rest_is_served() -> None:
    sup = start(1, timing=False)
    try:
        assert sup.submit(napping, (0.0,)).result(WAIT) == 0.0
        with serve_metrics(sup.status, 0) as server:
            families, samples = scrape(server.url)
    finally:
        sup.shutdown()
    assert "prefork_task_run_seconds" not in families and "prefork_task_queue_wait_seconds" not in families
    assert value(samples, "prefork_tasks_completed_total") == 1


def test_a_stopped_pool_is_scraped_as_stopped_with_its_final_counts() -> None:
    sup = start(1)
    sup.submit(napping, (0.0,)).result(WAIT)
    sup.shutdown()
    with serve_metrics(sup.status, 0) as server:
        families, samples = scrape(server.url)
    assert value(samples, "prefork_pool_state", state="stopped") == 1
    assert value(samples, "prefork_tasks_completed_total") == 1
    assert value(samples, "prefork_workers", state="idle") == 0
    assert value(samples, "prefork_worker_exits_total", cause="shutdown") == 1
    assert "prefork_worker_rss_bytes" not in families  # no worker, no series


# -- the families, from any snapshot -----------------------------------------------------------------------


def snapshot(name: str = "p", **changes: Any) -> dict[str, Any]:
    """A snapshot as prefork._status builds it (one idle worker, timing on)."""
    hist = {"buckets": list(BUCKETS), "counts": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
    s: dict[str, Any] = {
        "version": STATUS_VERSION, "name": name, "profile": "executor", "pid": 1, "uptime": 1.0, "started": 0.0,
        "state": "running", "policy": {"name": "fixed", "workers": 1, "max_workers": 1},
        "workers": [{"slot": 0, "pid": 2, "state": "idle", "served": 0, "age": 1.0, "rss": 4096, "task": None,
                     "method": None, "running_for": None}],
        "totals": {"workers": 1, "booting": 0, "idle": 1, "busy": 0, "stopping": 0, "queued": 0, "in_flight": 0,
                   "submitted": 0, "completed": 0, "failed": dict.fromkeys(FAILURE_KINDS, 0), "exits": {},
                   "spawned": 1},
        "timing": {"queue_wait": dict(hist), "run_time": json.loads(json.dumps(hist))},
    }
    s.update(changes)
    return s


def exposed(*snapshots: dict[str, Any]) -> dict[str, Metric]:
    """Through the text format and back, as Prometheus would read it."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(*(lambda s=s: s for s in snapshots)))
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_tasks_taken_back_are_a_counter_and_zero_for_a_status_without_them() -> None:
    with_count = snapshot("new")
    with_count["totals"]["taken_back"] = 3
    families = exposed(with_count, snapshot("old"))  # "old": a status from a prefork before the take-back
    samples = {s.labels["pool"]: s.value for s in families["prefork_tasks_taken_back"].samples
               if s.name == "prefork_tasks_taken_back_total"}
    assert families["prefork_tasks_taken_back"].type == "counter" and samples == {"new": 3.0, "old": 0.0}


counts = st.lists(st.integers(0, 10**12), min_size=len(BUCKETS) + 1, max_size=len(BUCKETS) + 1)


@settings(max_examples=60, deadline=None)
@given(run=counts, wait=counts, total=st.floats(0, 1e9, allow_nan=False))
def test_histogram_buckets_are_the_running_sums_of_the_snapshots_counts(run: list[int], wait: list[int], total: float) -> None:
    s = snapshot()
    s["timing"]["run_time"].update(counts=run, sum=total, count=sum(run))
    s["timing"]["queue_wait"].update(counts=wait, sum=total, count=sum(wait))
    families = exposed(s)
    for name, raw in (("prefork_task_run_seconds", run), ("prefork_task_queue_wait_seconds", wait)):
        series = bucket_series(families[name], "p")
        assert [le for le, _ in series] == [*BUCKETS, math.inf]
        cumulative = [c for _, c in series]
        assert [b - a for a, b in zip([0, *cumulative], cumulative, strict=False)] == raw
        by_name = {x.name: x.value for x in families[name].samples}
        assert by_name[f"{name}_count"] == sum(raw) and by_name[f"{name}_sum"] == pytest.approx(total)


hostile = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(a=hostile, b=hostile, cause=hostile)
def test_any_pool_name_and_exit_cause_round_trip_as_label_values(a: str, b: str, cause: str) -> None:
    """Pool names are user data (quotes, backslashes, newlines, `}`...): the exposition
    escapes them and the parser gives them back; two pools share one family."""
    if a == b:
        b = a + "2"
    first = snapshot(a)
    first["totals"]["exits"] = {cause: 3}
    families = exposed(first, snapshot(b, state="broken"))
    assert {s.labels["pool"] for s in families["prefork_workers_spawned"].samples} == {a, b}
    exits = {(s.labels["pool"], s.labels["cause"]): s.value for s in families["prefork_worker_exits"].samples
             if s.name.endswith("_total")}
    assert exits[(a, cause)] == 3
    assert exits.get((b, cause)) == (0 if cause in EXIT_CAUSES else None)  # known causes always, at 0 for b
    states = {(s.labels["pool"], s.labels["state"]): s.value for s in families["prefork_pool_state"].samples}
    assert states[(b, "broken")] == 1 and states[(a, "running")] == 1 and states[(a, "broken")] == 0


def test_every_metric_listed_is_exported_with_its_type_and_help() -> None:
    families = exposed(snapshot())
    assert set(families) == set(METRICS)
    for name, (kind, labels, doc) in METRICS.items():
        assert families[name].type == kind and families[name].documentation == doc
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == {"pool", *labels}


def test_registering_reads_no_pool_and_a_second_collector_of_the_same_metrics_is_refused() -> None:
    def boom() -> dict[str, Any]:
        raise AssertionError("describe() must not read the pool")

    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(boom))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolCollector(boom))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(version=2), r"pool 'p' has version 2; prefork.metrics reads version 1"),
        (lambda s: s.update(name=""), r"name = '' is not a pool name"),
        (lambda s: s["totals"].pop("completed"), r"pool 'p' lacks totals.completed"),
        (lambda s: s["totals"].update(queued=-1), r"totals.queued = -1 is not a count"),
        (lambda s: s["totals"].update(submitted=float("nan")), r"totals.submitted = nan is not a count"),
        (lambda s: s["totals"].update(exits=[]), r"totals.exits is not a mapping"),
        (lambda s: s["totals"]["failed"].update(error="1"), r"totals.failed.error = '1' is not a count"),
        (lambda s: s.update(state="sleeping"), r"state = 'sleeping' is not one of running, stopping"),
        (lambda s: s["timing"]["run_time"]["counts"].pop(), r"timing.run_time needs .* it has 16 and 16"),
        (lambda s: s["timing"]["run_time"]["buckets"].reverse(), r"timing.run_time needs increasing bucket bounds"),
        (lambda s: s["workers"][0].pop("slot"), r"lacks workers.0.slot"),
    ],
)
def test_a_snapshot_this_module_cannot_read_is_refused_naming_the_field(change: Any, message: str) -> None:
    s = snapshot()
    change(s)
    with pytest.raises(ValueError, match=message):
        metric_families(s)


def test_two_pools_of_one_name_in_one_scrape_are_refused() -> None:
    with pytest.raises(ValueError, match="two pools named 'p' in one scrape: give each pool its own name"):
        metric_families(snapshot("p"), snapshot("p"))


def test_a_collector_needs_callable_sources() -> None:
    with pytest.raises(TypeError, match="at least one status source"):
        PoolCollector()
    with pytest.raises(TypeError, match="must be callable, not dict"):
        PoolCollector(snapshot())  # type: ignore[arg-type]


# -- the endpoint ----------------------------------------------------------------------------------------------


def test_port_0_picks_a_port_close_frees_it_and_a_pool_that_cannot_answer_fails_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = {"fail": False}

    def status() -> dict[str, Any]:
        if state["fail"]:
            raise ConnectionRefusedError("the pool's control socket is gone")
        return snapshot("scraped")

    server = serve_metrics(status, 0)
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
    with socket.socket(fileno=os.dup(server.fileno())) as listening:  # what a forked child must close
        assert listening.getsockname() == ("127.0.0.1", server.port)
    assert scrape(server.url)[1][("prefork_workers_spawned_total", frozenset({("pool", "scraped")}))] == 1
    state["fail"] = True  # Prometheus sees a failed scrape (up == 0), never stale numbers
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(server.url, timeout=10)
        assert failed.value.code == 503
        assert failed.value.read() == b"reading the pool's status failed: ConnectionRefusedError(\"the pool's control socket is gone\")\n"
        failed.value.close()
    assert [r.levelname for r in caplog.records if r.name == "prefork.metrics"].count("WARNING") == 1  # once, not per scrape
    state["fail"] = False
    assert scrape(server.url)[0]  # and back
    server.close()
    server.close()  # twice is fine
    assert "closed" in repr(server) and server.fileno() == -1
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)
    with serve_metrics(status, server.port) as again:  # the port is free again: a restarted pool takes it back
        assert again.port == server.port and scrape(again.url)[0]


def test_serving_into_a_given_registry_adds_the_pool_and_close_takes_it_out() -> None:
    registry = CollectorRegistry()
    with serve_metrics(lambda: snapshot("scraped"), 0, registry=registry) as server:
        assert "prefork_workers" in {f.name for f in scrape(server.url)[0].values()}
        assert registry.get_sample_value("prefork_queue_depth", {"pool": "scraped"}) == 0
    assert registry.get_sample_value("prefork_queue_depth", {"pool": "scraped"}) is None
    with serve_metrics(lambda: snapshot("scraped"), 0, registry=registry):  # and may come back
        pass


def test_a_port_in_use_bad_ports_and_an_empty_address_are_refused_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"serve_metrics: cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve_metrics(snapshot, port)
    for bad in (-1, 65536, "9100", True, 1.5):
        with pytest.raises(ValueError, match=r"serve_metrics: port = .* must be an integer from 0 to 65535"):
            serve_metrics(snapshot, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"serve_metrics: host '' names no address; use '127.0.0.1'"):
        serve_metrics(snapshot, 0, addr="")


def test_without_prometheus_client_the_import_says_which_extra_to_install() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None\nimport prefork, prefork.executor\nimport prefork.metrics"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("prefork.errors.MissingExtra: prefork.metrics needs prometheus_client, which is not installed: "
                    "pip install 'prefork[metrics]'"), done.stderr


# -- docs/metrics.md, run ------------------------------------------------------------------------------------
#
# Each code block on the page is marked for this module by an HTML comment on the line before it:
# ``config`` (a prefork.toml, loaded), ``run`` (Python, run; an ``output`` block after it is what it prints),
# ``promql`` (one query a line, parsed), ``prometheus: scrape`` and ``prometheus: rules`` (prometheus.yml
# parts, read and their queries parsed).  Every metric, label and value a query names must be exported.

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"


class Block(NamedTuple):
    line: int
    mark: str
    lang: str
    code: str


def doc_blocks() -> list[Block]:
    found: list[Block] = []
    lines = DOC.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        mark = re.match(r"^<!-- (.*?) -->\s*$", lines[i - 1]) if i else None
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        found.append(Block(i + 1, mark.group(1) if mark else "", fence.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return found


BLOCKS = doc_blocks()
MARKS = ("config", "run", "output", "promql", "prometheus: scrape", "prometheus: rules")


def test_every_block_on_the_page_is_run_or_checked() -> None:
    for block in BLOCKS:
        assert block.mark in MARKS, f"docs/metrics.md:{block.line}: a block no test runs; mark it (see {__name__})"
    for before, block in itertools.pairwise(BLOCKS):
        if block.mark == "output":
            assert before.mark == "run", f"docs/metrics.md:{block.line}: output of nothing"
    assert [b.mark for b in BLOCKS].count("run") == 2 and [b.mark for b in BLOCKS].count("config") == 2


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mark == "config"], ids=lambda b: f"line {b.line}")
def test_the_pages_config_loads(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "prefork.toml"
    path.write_text(block.code, encoding="utf-8")
    load_config(path)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mark == "run"], ids=lambda b: f"line {b.line}")
def test_the_pages_python_runs_and_prints_what_the_page_shows(block: Block) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, f"docs/metrics.md:{block.line}", "exec"), {"__name__": "__doc__"})
    after = BLOCKS[BLOCKS.index(block) + 1]
    if after.mark == "output":
        assert out.getvalue() == after.code, f"docs/metrics.md:{after.line}: the page shows other output than it gives"


def promql() -> ModuleType:
    try:
        import promql_parser
    except ImportError:
        reason = "promql-parser is not installed (pip install promql-parser): the page's queries cannot be parsed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return promql_parser


#: label -> the values a query may match exactly
KNOWN_VALUES = {"kind": set(FAILURE_KINDS), "cause": set(EXIT_CAUSES), "state": {"booting", "idle", "busy", "stopping",
                                                                                  "running", "stopped", "broken"}}


def check_query(query: str, where: str) -> None:
    """Parse ``query``; every series it selects is one prefork.metrics exports, with its labels and values."""
    parser = promql()
    try:
        expr = parser.parse(query)
    except ValueError as exc:
        raise AssertionError(f"{where}: {query!r} does not parse: {exc}") from None
    selectors: list[Any] = []
    parser.walk(expr, lambda node: selectors.append(node) if isinstance(node, parser.VectorSelector) else None)
    assert selectors, f"{where}: {query!r} selects no series"
    for sel in selectors:
        family = re.sub(r"_(total|bucket|sum|count)$", "", sel.name)
        assert family in METRICS, f"{where}: {sel.name} is not exported by prefork.metrics"
        kind, labels, _ = METRICS[family]
        allowed = {"pool", *labels, *(["le"] if kind == "histogram" else [])}
        for matcher in sel.matchers.matchers:
            assert matcher.name in allowed, f"{where}: {sel.name} has no label {matcher.name!r}"
            for wanted in matcher.value.split("|"):
                assert wanted in KNOWN_VALUES.get(matcher.name, {wanted}), f"{where}: {matcher.name}={wanted!r} never occurs"
    for label in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", query):
        for name in (n.strip() for n in label.split(",")):
            assert name in {"pool", "le", "kind", "cause", "state", "slot"}, f"{where}: no series has the label {name!r}"


def test_the_pages_queries_parse_and_name_only_exported_series() -> None:
    (block,) = [b for b in BLOCKS if b.mark == "promql"]
    queries = block.code.splitlines()
    assert len(queries) >= 6
    for n, query in enumerate(queries):
        check_query(query, f"docs/metrics.md:{block.line + 1 + n}")


def test_the_pages_scrape_config_targets_the_configured_port() -> None:
    (block,) = [b for b in BLOCKS if b.mark == "prometheus: scrape"]
    (job,) = yaml.safe_load(block.code)["scrape_configs"]
    (metrics_config,) = [b for b in BLOCKS if b.mark == "config" and "metrics_port" in b.code]
    port = tomllib.loads(metrics_config.code)["control"]["metrics_port"]
    assert job["job_name"] == "prefork" and job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == str(port) for t in targets)


def test_the_pages_alert_rules_are_well_formed_and_their_queries_parse() -> None:
    (block,) = [b for b in BLOCKS if b.mark == "prometheus: rules"]
    (group,) = yaml.safe_load(block.code)["groups"]
    assert len(group["rules"]) >= 4
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Prefork[A-Za-z]+", rule["alert"]) and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("page", "ticket")
        check_query(rule["expr"], f"docs/metrics.md:{block.line} ({rule['alert']})")


def test_the_pages_table_lists_every_metric_and_only_those() -> None:
    text = DOC.read_text(encoding="utf-8")
    listed = re.findall(r"^\| `(prefork_\w+)(?:\{[^}]*\})?` \| (\w+) \|", text, re.M)
    exported = [(name + ("_total" if kind == "counter" else ""), kind) for name, (kind, _, _) in METRICS.items()]
    assert sorted(listed) == sorted(exported)


def test_the_settings_the_page_names_exist() -> None:
    config = load_config(None)
    for name in set(re.findall(r"`pool\.(\w+)`", DOC.read_text(encoding="utf-8"))):
        assert hasattr(config.pool, name), f"docs/metrics.md names pool.{name}, which is no setting"


def test_the_screenshot_the_page_shows_is_there() -> None:
    (image,) = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", DOC.read_text(encoding="utf-8"))
    png = (DOC.parent / image).read_bytes()  # written by tests/test_status_page.py
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 800)
