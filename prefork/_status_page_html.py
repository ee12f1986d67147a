"""The live status page's own text (``prefork._status_page`` serves it): its style,
its script, its body, the whole page as bytes (``PAGE``), and the
Content-Security-Policy (``CSP``) that lets the page run that script and that
style only.  The CSP names them by their SHA-256, computed here from the very
strings the page holds, so an edit to either can never leave a stale hash.

The script reads ``/status.json`` every second and writes every value into the
page as text (``textContent``, attributes set one by one), never as HTML.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

__all__ = ["CSP", "PAGE"]


_STYLE: Final = """
:root { --fg: #1d232b; --muted: #5f6b7a; --line: #d8dde3; --bg: #f6f7f9; --card: #fff;
        --booting: #8fb8ea; --idle: #9fd49f; --busy: #f5a742; --keepalive: #f2d56b; --stopping: #b9bec5;
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
.cell.keepalive { background: var(--keepalive); }
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
  const STATES = ["booting", "idle", "busy", "keepalive", "stopping"];
  const LETTER = {booting: "S", idle: "_", busy: "W", keepalive: "K", stopping: "G"};
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
    // only self-feeding pools (prefork serve) keep connections alive: a task pool's legend leaves it out
    $("legend-keepalive").hidden = !(s.profile === "mpm" || num(s.totals && s.totals.keepalive) > 0);
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
<li id="legend-keepalive" hidden><span class="cell keepalive">K</span>keepalive</li>
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
