"""The live status page: one self-contained HTML page and the snapshot it polls.

::

    browser ──GET /────────────▶ PAGE (static: inline CSS and JS, nothing else loaded)
       │
       └─every second: GET /status.json ──▶ get_status() ──▶ JSON snapshot (prefork._status)
             │
             ▼  the page's script, in the browser
           scoreboard (one cell per worker slot, coloured by state), totals, the worker table,
           and a ring buffer of the last five minutes for three charts (inline SVG):
           busy workers, queue depth, tasks completed (and failed) per second

The page is the same bytes for every pool: the server never writes data into
HTML.  The script puts every value from the snapshot into the page as text
(``textContent``, attributes set one by one), so a method named ``<script>`` is
shown as those characters; the Content-Security-Policy runs no script but the
page's own (by hash) and lets the page reach nothing but its own server.

Served by the stdlib's ``ThreadingHTTPServer`` from a daemon thread, on
loopback unless another address is named.  On loopback, a request whose
``Host`` is not a loopback name is refused: a web page elsewhere that points a
DNS name at 127.0.0.1 cannot read the pool's status through a visitor's browser.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["PAGE", "StatusPage", "check_bind", "serve_status_page"]

log = logging.getLogger("prefork.status_page")

_STYLE: Final = """
:root { --fg: #1d232b; --muted: #5f6b7a; --line: #d8dde3; --bg: #f6f7f9; --card: #fff;
        --booting: #8fb8ea; --idle: #9fd49f; --busy: #f5a742; --stopping: #b9bec5;
        --queue: #8a63c9; --done: #2f9e57; --failed: #d64545; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 20px; background: var(--card);
         border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 20px; }
h2 { margin: 0 0 8px; font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); }
#meta { color: var(--muted); }
#conn { margin-left: auto; padding: 2px 10px; border-radius: 10px; font-size: 12px; background: #e3f4e6; color: #1e6b34; }
#conn.down { background: #fbe3e3; color: #9b1c1c; }
main { padding: 14px 20px; display: grid; gap: 14px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; }
.board { display: flex; flex-wrap: wrap; gap: 4px; }
.cell { width: 30px; height: 30px; border-radius: 4px; display: flex; align-items: center; justify-content: center;
        font: 600 15px/1 ui-monospace, "DejaVu Sans Mono", monospace; border: 1px solid rgba(0,0,0,.18); cursor: default; }
.cell.booting { background: var(--booting); }
.cell.idle { background: var(--idle); }
.cell.busy { background: var(--busy); }
.cell.stopping { background: var(--stopping); }
.cell.unknown { background: #fff; }
.cell.open { background: transparent; border: 1px dashed #c4cad1; color: #a3abb5; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; margin: 10px 0 0; padding: 0; list-style: none; color: var(--muted);
          font-size: 12px; }
.legend .cell { width: 18px; height: 18px; font-size: 11px; display: inline-flex; margin-right: 5px; vertical-align: middle; }
.more { align-self: center; color: var(--muted); font-size: 12px; margin-left: 6px; }
.charts { display: grid; grid-template-columns: repeat(3, 1fr); gap: 14px; }
.charts section { padding-bottom: 6px; }
.now { float: right; font-weight: 600; color: var(--fg); text-transform: none; letter-spacing: 0; font-size: 13px; }
svg.chart { width: 100%; height: 120px; display: block; }
svg.chart .frame { fill: none; stroke: var(--line); }
svg.chart .grid { stroke: var(--line); stroke-dasharray: 3 3; }
svg.chart text { font-size: 10px; fill: var(--muted); }
svg.chart .line { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg.chart .area { stroke: none; opacity: .18; }
.busy-s { stroke: var(--busy); fill: var(--busy); }
.queue-s { stroke: var(--queue); fill: var(--queue); }
.done-s { stroke: var(--done); fill: var(--done); }
.failed-s { stroke: var(--failed); fill: var(--failed); }
.key { font-size: 11px; color: var(--muted); text-transform: none; letter-spacing: 0; }
.key i { display: inline-block; width: 10px; height: 3px; vertical-align: middle; margin: 0 4px 0 10px; }
.key .done-k { background: var(--done); }
.key .failed-k { background: var(--failed); }
.totals { display: grid; grid-template-columns: repeat(4, 1fr); gap: 14px; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 12px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; font-variant-numeric: tabular-nums; text-align: right; overflow-wrap: anywhere; }
dd.bad { color: var(--failed); font-weight: 600; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th { text-align: left; color: var(--muted); font-weight: 500; font-size: 12px; border-bottom: 1px solid var(--line); }
td, th { padding: 3px 8px; }
td.method { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; overflow-wrap: anywhere; }
tr:nth-child(even) td { background: #fafbfc; }
#problem { display: none; background: #fbe3e3; color: #9b1c1c; border-color: #f0b4b4; }
#problem.shown { display: block; }
"""

_SCRIPT: Final = r"""
"use strict";
(function () {
  const PERIOD = 1000;          // ms between polls
  const CAPACITY = 300;         // samples kept: five minutes at one a second
  const MAX_CELLS = 512;        // open slots drawn at most (a huge max_workers stays cheap)
  const STATES = ["booting", "idle", "busy", "stopping"];
  const LETTER = {booting: "S", idle: "_", busy: "W", stopping: "G"};
  const SVG = "http://www.w3.org/2000/svg";
  const ring = [];              // {t, busy, max, queued, done, failed} (rates per second)
  let last = null;              // previous snapshot's counters, for the rates
  let lastOk = null;

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    return e;
  }
  function num(v) { return typeof v === "number" && isFinite(v) ? v : 0; }
  function dur(s) {
    if (typeof s !== "number" || !isFinite(s)) return "";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }
  function mib(b) { return typeof b === "number" ? (b / 1048576).toFixed(1) + " MiB" : ""; }
  function stateOf(w) { return STATES.includes(w.state) ? w.state : "unknown"; }
  function sum(obj) { let n = 0; for (const k in obj) n += num(obj[k]); return n; }

  function renderHeader(s) {
    $("name").textContent = String(s.name);
    document.title = String(s.name) + " \u2014 prefork status";
    $("meta").textContent = [
      "profile " + s.profile, "pid " + s.pid, String(s.state), "up " + dur(s.uptime),
    ].join(" \u00b7 ");
  }

  function renderBoard(s) {
    const board = $("board");
    const cells = [];
    for (const w of s.workers) {
      const st = stateOf(w);
      const c = el("div", "cell worker " + st, LETTER[st] || "?");
      c.dataset.slot = String(w.slot);
      c.dataset.pid = String(w.pid);
      const lines = ["slot " + w.slot + " \u00b7 pid " + w.pid + " \u00b7 " + w.state];
      if (w.task !== null && w.task !== undefined) lines.push("task " + w.task);
      if (w.method) lines.push("method " + w.method);
      if (w.running_for !== null && w.running_for !== undefined) lines.push("running for " + dur(w.running_for));
      if (w.leaving) lines.push("leaving: " + w.leaving);
      lines.push("served " + w.served + " \u00b7 age " + dur(w.age) + (w.rss ? " \u00b7 rss " + mib(w.rss) : ""));
      c.title = lines.join("\n");
      cells.push(c);
    }
    const max = num(s.policy && s.policy.max_workers);
    const open = Math.max(0, max - s.workers.length);
    const drawn = Math.min(open, Math.max(0, MAX_CELLS - cells.length));
    for (let i = 0; i < drawn; i++) {
      const c = el("div", "cell open", ".");
      c.title = "open slot";
      cells.push(c);
    }
    if (drawn < open) cells.push(el("span", "more", "+" + (open - drawn) + " open slots"));
    board.replaceChildren(...cells);
  }

  function dl(rows) {
    const d = el("dl");
    for (const [k, v, bad] of rows) {
      d.append(el("dt", null, k));
      d.append(el("dd", bad ? "bad" : null, v));
    }
    return d;
  }
  function titled(title, body) {
    const sec = el("section");
    sec.append(el("h2", null, title), body);
    return sec;
  }
  function renderTotals(s) {
    const t = s.totals;
    const failed = Object.entries(t.failed || {}).map(([k, v]) => [k, v, num(v) > 0]);
    const exits = Object.entries(t.exits || {}).map(([k, v]) => [k, v, k === "crash" || k === "boot-failure"]);
    if (!exits.length) exits.push(["none yet", ""]);
    const policy = [];
    for (const [k, v] of Object.entries(s.policy || {})) if (k !== "name") policy.push([k, v]);
    $("totals").replaceChildren(
      titled("Tasks", dl([["queued", t.queued], ["in flight", t.in_flight], ["submitted", t.submitted],
                          ["completed", t.completed], ["failed", sum(t.failed), sum(t.failed) > 0]])),
      titled("Failed by kind", dl(failed)),
      titled("Worker exits by cause", dl(exits.concat([["spawned", t.spawned]]))),
      titled("Policy: " + (s.policy ? s.policy.name : "?"), dl(policy)),
    );
  }

  function renderWorkers(s) {
    const rows = s.workers.map((w) => {
      const tr = el("tr");
      tr.dataset.slot = String(w.slot);
      for (const [v, cls] of [[w.slot], [w.pid], [w.state], [w.task], [w.method, "method"], [dur(w.running_for)],
                              [w.served], [mib(w.rss)], [dur(w.age)]]) {
        tr.append(el("td", cls || null, v));
      }
      return tr;
    });
    $("workers").replaceChildren(...rows);
  }

  function niceCeil(v) {
    if (v <= 1) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function fmt(v) { return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1); }

  // One chart: series [{key, cls}] read from the ring; the x axis spans the samples kept
  // (at least 30 s), ending now.
  function drawChart(svg, series, floor) {
    const W = 360, H = 120, L = 34, R = 6, T = 8, B = 16;
    const now = ring.length ? ring[ring.length - 1].t : 0;
    const span = Math.max(30000, ring.length ? now - ring[0].t : 0);
    let top = floor || 1;
    for (const p of ring) for (const s of series) if (p[s.key] !== null) top = Math.max(top, p[s.key]);
    top = niceCeil(top);
    const x = (t) => L + (W - L - R) * (1 - (now - t) / span);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const kids = [
      svgEl("line", {x1: L, x2: W - R, y1: y(top), y2: y(top), class: "grid"}),
      svgEl("line", {x1: L, x2: W - R, y1: y(top / 2), y2: y(top / 2), class: "grid"}),
      svgEl("rect", {x: L, y: T, width: W - L - R, height: H - T - B, class: "frame"}),
    ];
    const label = (text, attrs) => { const e = svgEl("text", attrs); e.textContent = text; return e; };
    kids.push(label(fmt(top), {x: L - 4, y: y(top) + 4, "text-anchor": "end"}));
    kids.push(label(fmt(top / 2), {x: L - 4, y: y(top / 2) + 4, "text-anchor": "end"}));
    kids.push(label("0", {x: L - 4, y: y(0) + 4, "text-anchor": "end"}));
    kids.push(label("\u2212" + dur(span / 1000).replace(/\.\d+ s$/, " s"), {x: L, y: H - 3}));
    kids.push(label("now", {x: W - R, y: H - 3, "text-anchor": "end"}));
    let count = 0;
    for (const s of series) {
      const pts = ring.filter((p) => p[s.key] !== null).map((p) => x(p.t).toFixed(1) + "," + y(p[s.key]).toFixed(1));
      count = Math.max(count, pts.length);
      if (pts.length) {
        const first = pts[0].split(",")[0], lastX = pts[pts.length - 1].split(",")[0];
        kids.push(svgEl("polygon", {points: first + "," + y(0) + " " + pts.join(" ") + " " + lastX + "," + y(0),
                                    class: "area " + s.cls}));
        kids.push(svgEl("polyline", {points: pts.join(" "), class: "line " + s.cls, "data-series": s.key}));
      }
    }
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.dataset.samples = String(count);
    svg.replaceChildren(...kids);
  }

  function record(s) {
    const t = performance.now();
    const failed = sum(s.totals.failed);
    const done = num(s.totals.completed);
    let doneRate = null, failedRate = null;
    if (last && t > last.t && done >= last.done && failed >= last.failed) {  // a restarted pool resets its counters
      doneRate = (done - last.done) * 1000 / (t - last.t);
      failedRate = (failed - last.failed) * 1000 / (t - last.t);
    }
    last = {t, done, failed};
    ring.push({t, busy: num(s.totals.busy), queued: num(s.totals.queued), done: doneRate, failed: failedRate});
    if (ring.length > CAPACITY) ring.shift();
    const max = num(s.policy && s.policy.max_workers);
    drawChart($("chart-busy"), [{key: "busy", cls: "busy-s"}], max);
    drawChart($("chart-queue"), [{key: "queued", cls: "queue-s"}], 1);
    drawChart($("chart-rate"), [{key: "done", cls: "done-s"}, {key: "failed", cls: "failed-s"}], 1);
    $("busy-now").textContent = s.totals.busy + " of " + s.totals.workers + " (max " + max + ")";
    $("queue-now").textContent = String(s.totals.queued);
    $("rate-now").textContent = doneRate === null ? "" : doneRate.toFixed(1) + " /s";
  }

  function problem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.className = text ? "shown" : "";
  }

  function render(s) {
    if (!s || s.version !== 1) {
      problem("This page reads status version 1; the pool sent version " + (s && s.version) + ".");
      return;
    }
    renderHeader(s);
    renderBoard(s);
    renderTotals(s);
    renderWorkers(s);
    record(s);
    problem(s.state === "broken" ? "The pool is broken: it takes no more tasks." : "");
  }

  async function tick() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 5000);
    try {
      const r = await fetch("status.json", {cache: "no-store", signal: abort.signal});
      const body = await r.json();
      if (!r.ok) throw new Error(body && body.error ? body.error : "HTTP " + r.status);
      render(body);
      lastOk = new Date();
      $("conn").textContent = "live \u00b7 " + lastOk.toLocaleTimeString();
      $("conn").className = "";
    } catch (e) {
      $("conn").textContent = "no answer" + (lastOk ? " since " + lastOk.toLocaleTimeString() : "") + ": " + e.message;
      $("conn").className = "down";
    } finally {
      clearTimeout(timer);
      setTimeout(tick, PERIOD);
    }
  }

  tick();
})();
"""

_BODY: Final = """<header><h1 id="name">prefork</h1><span id="meta"></span><span id="conn">connecting</span></header>
<main>
<section id="problem"></section>
<section>
<h2>Scoreboard</h2>
<div id="board" class="board"></div>
<ul class="legend">
<li><span class="cell booting">S</span>booting</li>
<li><span class="cell idle">_</span>idle</li>
<li><span class="cell busy">W</span>busy</li>
<li><span class="cell stopping">G</span>stopping</li>
<li><span class="cell open">.</span>open slot</li>
</ul>
</section>
<div class="charts">
<section><h2>Busy workers<span class="now" id="busy-now"></span></h2><svg id="chart-busy" class="chart"></svg></section>
<section><h2>Queue depth<span class="now" id="queue-now"></span></h2><svg id="chart-queue" class="chart"></svg></section>
<section><h2>Throughput<span class="key"><i class="done-k"></i>completed<i class="failed-k"></i>failed</span>\
<span class="now" id="rate-now"></span></h2><svg id="chart-rate" class="chart"></svg></section>
</div>
<div id="totals" class="totals"></div>
<section>
<h2>Workers</h2>
<table><thead><tr><th>slot</th><th>pid</th><th>state</th><th>task</th><th>method</th><th>running for</th><th>served</th>\
<th>rss</th><th>age</th></tr></thead><tbody id="workers"></tbody></table>
</section>
</main>"""

#: the whole page: the same bytes for every pool (the data comes from /status.json)
PAGE: Final = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<link rel="icon" href="data:,"><title>prefork status</title>'
    f"<style>{_STYLE}</style></head><body>\n{_BODY}\n<script>{_SCRIPT}</script></body></html>\n"
).encode()


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


#: the page runs its own script and style, reaches only its own server, loads nothing else
CSP: Final = (
    f"default-src 'none'; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, what: str) -> bool:
    """Check an address to listen on; ``True`` if it is loopback (this machine only).

    An empty host is refused: the stdlib reads it as every interface, which
    must be asked for by name (``0.0.0.0`` or ``::``)."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"{what}: host {host!r} names no address; use '127.0.0.1' (this machine only) "
                         "or '0.0.0.0' (every interface, reachable from other machines)")
    if host.lower() in _LOOPBACK_NAMES or _is_loopback_address(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{what}: host {host!r} cannot be resolved ({exc.strerror})") from None
    return all(_is_loopback_address(str(info[4][0])) for info in infos)


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8080`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 get_status: Callable[[], Mapping[str, Any]], loopback: bool) -> None:
        self.address_family = family
        self.get_status = get_status
        self.loopback = loopback
        self.failing = False  #: the last get_status raised (its next failure is logged quietly)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "prefork-status"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        host = self.headers.get("Host")
        if self.server.loopback and host is not None:
            name = _host_of(host.strip()).lower()
            if name not in _LOOPBACK_NAMES and not _is_loopback_address(name):
                self._send(HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8",
                           b"this status page answers to loopback names only (Host: 127.0.0.1, localhost or [::1])\n",
                           body)
                return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE, body)
        elif path == "/status.json":
            self._status(body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try / or /status.json\n", body)

    def _status(self, body: bool) -> None:
        try:
            data = json.dumps(self.server.get_status(), allow_nan=False).encode()
        except Exception as exc:
            (log.debug if self.server.failing else log.warning)("status page: reading the pool's status failed: %r", exc)
            self.server.failing = True
            error = json.dumps({"error": f"reading the pool's status failed: {exc!r}"}).encode()
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", error, body)
            return
        self.server.failing = False
        self._send(HTTPStatus.OK, "application/json", data, body)

    def _send(self, status: HTTPStatus, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status page: %s %s", self.address_string(), format % args)


class StatusPage:
    """A status page being served: ``url``, ``host``, ``port``, ``close()``."""

    __slots__ = ("_lock", "_server", "_thread", "host", "port")

    def __init__(self, host: str, port: int, server: _Server, thread: threading.Thread) -> None:
        self.host = host
        self.port = port
        self._server: _Server | None = server
        self._thread = thread
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def fileno(self) -> int:
        """The listening socket (-1 once closed): a process forked from this one should close it."""
        server = self._server
        return server.fileno() if server is not None else -1

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(5)

    def __enter__(self) -> StatusPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StatusPage {self.url}{' closed' if self._server is None else ''}>"


def serve_status_page(get_status: Callable[[], Mapping[str, Any]], host: str = "127.0.0.1", port: int = 0) -> StatusPage:
    """Serve the live status page of the pool whose snapshot ``get_status`` returns
    (``Supervisor.status``, or a control-socket client) at ``http://host:port/``,
    from a daemon thread.  Loopback unless ``host`` names another address (then
    anyone who reaches it sees the pool: its methods, pids and counts).  ``port``
    0 picks a free port (see ``.port``)."""
    if not callable(get_status):
        raise TypeError(f"serve_status_page: get_status must be callable, not {type(get_status).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_status_page: port = {port!r} must be an integer from 0 to 65535 (0: any free port)")
    loopback = check_bind(host, "serve_status_page")
    bind = host.strip("[]")
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    try:
        server = _Server((bind, port), family, get_status, loopback)
    except OSError as exc:
        raise OSError(exc.errno, f"serve_status_page: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name=f"prefork-status-page:{server.server_address[1]}",
                              daemon=True)
    thread.start()
    page = StatusPage(bind, int(server.server_address[1]), server, thread)
    if loopback:
        log.info("status page at %s", page.url)
    else:
        log.warning("status page at %s, reachable from other machines: anyone who reaches it sees the pool", page.url)
    return page
