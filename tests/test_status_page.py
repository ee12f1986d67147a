"""The live status page (prefork._status_page), in a real headless browser: Debian's
chromium and chromium-driver through selenium.  The page loads, shows one cell per
worker, follows a worker going busy and back, draws its charts, shows everything the
snapshot says as text (a method named ``<script>`` included), and says when the pool
stops answering.  One test writes docs/img/status-page.png, the screenshot the docs
show (1200x800, on every run).

Without a browser these tests skip, naming what to install; under ``CI=true`` they fail.
The server's own rules (routes, headers, the Host check, a pool that cannot answer,
the address it binds) are tested over plain HTTP."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from prefork import TaskTimeout, WorkerLost
from prefork._status import BUCKETS, FAILURE_KINDS, STATUS_VERSION
from prefork._status_page import CSP, PAGE, StatusPage, serve_status_page
from prefork._supervisor import Supervisor
from prefork.config import load_config
from prefork.testing import wait_for_file, wait_until

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "img" / "status-page.png"
WAIT = 30.0  # seconds for any one thing to show; generous for a loaded machine
SIZE = (1200, 800)
HOSTILE = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">&amp;'\"\u202e"

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", f"--window-size={SIZE[0]},{SIZE[1]}",
)


# -- the browser --------------------------------------------------------------------------------------------


def missing_browser(which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why no browser test can run here, or ``None``."""
    missing = [name for name in ("chromium", "chromedriver") if which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        return f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
    return None


def need_browser(reason: str | None, env: dict[str, str] | os._Environ[str] = os.environ) -> None:
    if reason is None:
        return
    if env.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so the status page must be tested", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless chromium, its viewport 1200x800 at scale 1 (the screenshot's size).
    Function-scoped: its processes are gone before the test's leak check."""
    need_browser(missing_browser())
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    # a driver path given: selenium does not go looking for (or downloading) one
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which("chromedriver"))))
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": SIZE[0], "height": SIZE[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def wait_js(driver: WebDriver, script: str, what: str, timeout: float = WAIT) -> Any:
    """Poll a script in the page until it returns something true; that value."""
    return wait_until(lambda: driver.execute_script(script), timeout, interval=0.05, what=what)


CELLS = "return [...document.querySelectorAll('#board .cell.worker')].map(c => [c.className, c.dataset.slot, c.title])"
SAMPLES = "return [...document.querySelectorAll('svg.chart')].map(s => Number(s.dataset.samples))"
POINTS = ("return Object.fromEntries([...document.querySelectorAll('svg.chart polyline')]"
          ".map(p => [p.dataset.series, p.getAttribute('points').trim().split(/\\s+/).length]))")
INJECTED = "return [window.pwned, document.querySelectorAll('img').length, document.scripts.length]"


# -- a real pool ------------------------------------------------------------------------------------------------


def gate(path: str) -> int:
    return wait_for_file(path, WAIT)


# A method name is user data: this one shows up wherever the page names the method.
gate.__qualname__ = HOSTILE  # cloudpickle sends it by value (no module attribute has that name)


def start(overrides: dict[str, Any]) -> Supervisor:
    sup = Supervisor(load_config(None, {"scaling.name": "fixed", **overrides}))
    sup.tally.timing = True
    sup.start()
    return sup


@pytest.fixture
def pool() -> Iterator[Supervisor]:
    sup = start({"name": "web", "scaling.workers": 3})
    try:
        yield sup
    finally:
        sup.shutdown()


@pytest.fixture
def page(pool: Supervisor) -> Iterator[StatusPage]:
    with serve_status_page(pool.status) as served:
        yield served


def test_the_page_shows_each_worker_and_follows_one_going_busy_and_back(
    browser: WebDriver, pool: Supervisor, page: StatusPage, tmp_path: Path
) -> None:
    browser.get(page.url)
    idle = wait_js(browser, CELLS.replace("return ", "const c = ") + "; return c.length === 3 && "
                   "c.every(x => x[0] === 'cell worker idle') && c", "three idle cells")
    assert sorted(int(slot) for _, slot, _ in idle) == sorted(w["slot"] for w in pool.status()["workers"])
    assert browser.execute_script("return document.getElementById('name').textContent") == "web"
    assert browser.title == "web \u2014 prefork status"

    opened = tmp_path / "gate"
    fut = pool.submit(gate, (str(opened),))
    try:
        busy = wait_js(browser, CELLS.replace("return ", "const c = ") + "; const b = c.filter(x => "
                       "x[0] === 'cell worker busy'); return b.length === 1 && b[0]", "a busy cell")
        (worker,) = [w for w in pool.status()["workers"] if w["state"] == "busy"]
        assert busy[1] == str(worker["slot"])
        hover = busy[2].splitlines()
        assert hover[0] == f"slot {worker['slot']} \u00b7 pid {worker['pid']} \u00b7 busy"
        assert hover[1] == f"task {worker['task']}"
        assert hover[2] == f"method {__name__}:{HOSTILE}"  # the hostile name, as text
        assert re.fullmatch(r"running for \d+\.\d\d s", hover[3])
        row = browser.execute_script(
            f"return [...document.querySelectorAll('#workers tr[data-slot=\"{worker['slot']}\"] td')].map(t => t.textContent)")
        assert row[2:5] == ["busy", str(worker["task"]), f"{__name__}:{HOSTILE}"]
        assert browser.execute_script(INJECTED) == [None, 0, 1]  # nothing it says ran or was made an element
    finally:
        opened.touch()
    assert fut.result(WAIT) > 0
    wait_js(browser, CELLS.replace("return ", "const c = ") + "; return c.length === 3 && "
            "c.every(x => x[0] === 'cell worker idle')", "the cell idle again")
    totals = wait_js(browser, "const d = [...document.querySelectorAll('#totals dd')].map(x => x.textContent);"
                     "return d[3] === '1' && d", "one completed task in the totals")
    assert totals[:5] == ["0", "0", "1", "1", "0"]  # queued, in flight, submitted, completed, failed
    # the charts: one point a second, kept in the page
    wait_js(browser, SAMPLES.replace("return ", "const n = ") + "; return n.length === 3 && n.every(x => x >= 3)",
            "three points in each chart")
    points = browser.execute_script(POINTS)
    assert points["busy"] >= 3 and points["queued"] >= 3 and points["done"] >= 2 and points["failed"] >= 2


def render_invoice(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def resize_image(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def parse_feed(seconds: float) -> float:
    if seconds == 0.9:
        raise ValueError("malformed feed")
    time.sleep(seconds)
    return seconds


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_screenshot_for_the_docs(browser: WebDriver) -> None:
    """A pool of the spare policy under a steady stream of work, then a burst it absorbs:
    the charts show the queue rise and fall.  Written to docs/img/status-page.png, 1200x800."""
    sup = start({"name": "shop", "scaling.name": "spare", "scaling.start_servers": 4, "scaling.min_spare": 2,
                 "scaling.max_spare": 4, "scaling.max_servers": 20, "scaling.tick": 0.5})
    methods = (render_invoice, resize_image, parse_feed)
    stop = threading.Event()

    def feed() -> None:  # about six tasks a second, 0.3 to 0.9 s each; one in 21 fails
        i = 0
        while not stop.wait(0.15):
            sup.submit(methods[i % 3], ((0.3, 0.5, 0.7, 0.4, 0.9, 0.6, 0.35)[i % 7],))
            i += 1

    feeder = threading.Thread(target=feed)
    try:
        with serve_status_page(sup.status) as served:
            browser.get(served.url)
            wait_js(browser, "return document.querySelectorAll('#board .cell.worker').length >= 4", "the board")
            assert isinstance(sup.submit(crash).exception(WAIT), WorkerLost)
            assert isinstance(sup.submit(render_invoice, (10.0,), timeout=0.3).exception(WAIT), TaskTimeout)
            feeder.start()
            wait_js(browser, SAMPLES.replace("return ", "const n = ") + "; return n.every(x => x >= 4)", "four seconds")
            for i in range(80):  # a burst: the queue grows, the policy forks, the queue drains
                sup.submit(methods[i % 2], (0.5 + i % 5 / 10,))
            wait_js(browser, "return Number(document.getElementById('queue-now').textContent) >= 5", "the queue shown")
            wait_js(browser, "return document.getElementById('queue-now').textContent === '0' && "
                    "document.querySelectorAll('#board .cell.idle').length >= 2", "the burst absorbed")
            png = browser.get_screenshot_as_png()
    finally:
        stop.set()
        if feeder.ident is not None:
            feeder.join(WAIT)
        sup.shutdown(cancel_futures=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == SIZE  # IHDR: width, height
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)


# -- everything the snapshot says is text -------------------------------------------------------------------


def hostile_snapshot() -> dict[str, Any]:
    hist = {"buckets": list(BUCKETS), "counts": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0}
    return {
        "version": STATUS_VERSION, "name": HOSTILE, "profile": HOSTILE, "pid": HOSTILE, "uptime": 5.0,
        "started": 0.0, "state": HOSTILE, "policy": {"name": HOSTILE, HOSTILE: HOSTILE, "max_workers": 3},
        "workers": [
            {"slot": 0, "pid": 11, "state": "busy", "served": 1, "age": 4.0, "rss": 2**20, "task": 7,
             "method": HOSTILE, "running_for": 1.5, "leaving": HOSTILE},
            {"slot": 1, "pid": 12, "state": HOSTILE, "served": HOSTILE, "age": 4.0, "rss": None, "task": None,
             "method": None, "running_for": None},
        ],
        "totals": {"workers": 2, "booting": 0, "idle": 0, "busy": 1, "stopping": 0, "queued": 0, "in_flight": 1,
                   "submitted": 2, "completed": 1, "failed": {**dict.fromkeys(FAILURE_KINDS, 0), HOSTILE: 1},
                   "exits": {HOSTILE: 2}, "spawned": 2},
        "timing": {"queue_wait": hist, "run_time": hist},
    }


def test_every_string_of_the_snapshot_is_shown_as_text_and_a_silent_pool_is_flagged(browser: WebDriver) -> None:
    failing = threading.Event()

    def status() -> dict[str, Any]:
        if failing.is_set():
            raise ConnectionRefusedError("the pool's control socket is gone")
        return hostile_snapshot()

    with serve_status_page(status) as served:
        browser.get(served.url)
        wait_js(browser, "return document.querySelectorAll('#board .cell.worker').length === 2", "two cells")
        assert browser.execute_script(INJECTED) == [None, 0, 1]
        texts = browser.execute_script(
            "return {name: document.getElementById('name').textContent, title: document.title,"
            " meta: document.getElementById('meta').textContent,"
            " cells: [...document.querySelectorAll('#board .cell')].map(c => [c.className, c.textContent, c.title]),"
            " dts: [...document.querySelectorAll('#totals dt')].map(x => x.textContent),"
            " h2s: [...document.querySelectorAll('#totals h2')].map(x => x.textContent),"
            " tds: [...document.querySelectorAll('#workers td')].map(x => x.textContent)}")
        assert texts["name"] == HOSTILE and texts["title"] == f"{HOSTILE} \u2014 prefork status"
        assert texts["meta"] == f"profile {HOSTILE} \u00b7 pid {HOSTILE} \u00b7 {HOSTILE} \u00b7 up 5.00 s"
        (busy, odd, open_slot) = texts["cells"]
        assert busy[:2] == ["cell worker busy", "W"] and f"method {HOSTILE}" in busy[2].splitlines()
        assert f"leaving: {HOSTILE}" in busy[2].splitlines()
        assert odd[:2] == ["cell worker unknown", "?"] and odd[2].startswith(f"slot 1 \u00b7 pid 12 \u00b7 {HOSTILE}")
        assert open_slot == ["cell open", ".", "open slot"]  # max_workers 3, two workers
        assert texts["dts"].count(HOSTILE) == 3  # a failure kind, an exit cause, a policy field
        assert f"Policy: {HOSTILE}" in texts["h2s"]
        assert HOSTILE in texts["tds"]
        assert browser.execute_script(INJECTED) == [None, 0, 1]

        failing.set()
        said = wait_js(browser, "const c = document.getElementById('conn');"
                       "return c.className === 'down' && c.textContent", "the page to say the pool is silent")
        assert said.startswith("no answer since ") and said.endswith(
            "reading the pool's status failed: ConnectionRefusedError(\"the pool's control socket is gone\")")
        failing.clear()
        wait_js(browser, "const c = document.getElementById('conn'); return c.className === '' && "
                "c.textContent.startsWith('live')", "the page live again")


# -- the server, over plain HTTP ----------------------------------------------------------------------------------


def get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.putrequest("GET", parts.path or "/", skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_the_page_is_one_self_contained_document_with_a_strict_policy() -> None:
    with serve_status_page(hostile_snapshot) as served:
        status, headers, body = get(served.url)
    assert status == 200 and body == PAGE and headers["content-type"] == "text/html; charset=utf-8"
    html = body.decode()
    # nothing loaded from elsewhere: no src=, the one href is the empty icon, the one URL a namespace
    assert not re.search(r"\bsrc\s*=", html, re.I) and re.findall(r"href=\"([^\"]*)\"", html) == ["data:,"]
    assert re.findall(r"https?://[^\s\"')]+", html) == ["http://www.w3.org/2000/svg"]
    assert "@import" not in html and "url(" not in html and "innerHTML" not in html and "eval(" not in html
    # the policy's hashes are those of the page's one script and one style: nothing else runs
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert headers["content-security-policy"] == CSP
    assert f"script-src {digest(script)};" in CSP and f"style-src {digest(style)};" in CSP
    assert "default-src 'none'" in CSP and "connect-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"


def test_status_json_is_the_snapshot_other_paths_are_404_and_the_server_stays_quiet(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with serve_status_page(hostile_snapshot) as served:
        status, headers, body = get(served.url + "status.json?t=1")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == hostile_snapshot()
        for path in ("favicon.ico", "status.json/x", "../etc/passwd", "index.html"):
            assert get(served.url + path)[0] == 404
    assert capfd.readouterr().err == ""  # requests go to the debug log, not to stderr


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:1"])
def test_on_loopback_a_request_for_another_host_name_is_refused(host: str) -> None:
    """A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) reads nothing."""
    with serve_status_page(hostile_snapshot) as served:
        status, _, body = get(served.url + "status.json", host=host)
        assert status == 403 and b"loopback names only" in body
        for fine in (f"127.0.0.1:{served.port}", f"localhost:{served.port}", "LOCALHOST", f"[::1]:{served.port}"):
            assert get(served.url + "status.json", host=fine)[0] == 200


def test_a_pool_that_cannot_answer_gets_503_with_one_line_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def status() -> dict[str, Any]:
        raise ConnectionRefusedError("gone")

    caplog.set_level(logging.WARNING, "prefork.status_page")
    with serve_status_page(status) as served:
        for _ in range(3):
            code, _, body = get(served.url + "status.json")
            assert code == 503 and json.loads(body) == {"error": "reading the pool's status failed: ConnectionRefusedError('gone')"}
    assert [r.getMessage() for r in caplog.records] == [
        "status page: reading the pool's status failed: ConnectionRefusedError('gone')"]


def test_port_0_picks_a_port_and_close_frees_it() -> None:
    served = serve_status_page(hostile_snapshot)
    assert served.port > 0 and served.url == f"http://127.0.0.1:{served.port}/"
    assert get(served.url)[0] == 200
    with socket.socket(fileno=os.dup(served.fileno())) as listening:  # what a forked child must close
        assert listening.getsockname() == ("127.0.0.1", served.port)
    served.close()
    served.close()
    assert "closed" in repr(served) and served.fileno() == -1
    with pytest.raises(OSError):
        get(served.url)
    with serve_status_page(hostile_snapshot, port=served.port) as again:
        assert get(again.url)[0] == 200


def test_ipv6_loopback_and_localhost_are_loopback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "prefork.status_page")
    if socket.has_ipv6:
        try:
            with serve_status_page(hostile_snapshot, "::1") as served:
                assert served.url == f"http://[::1]:{served.port}/" and get(served.url)[0] == 200
        except OSError as exc:  # a machine without an IPv6 loopback
            assert "cannot listen on ::1" in str(exc)
    with serve_status_page(hostile_snapshot, "localhost") as served:
        assert get(f"http://127.0.0.1:{served.port}/")[0] == 200
    assert all(r.levelname == "INFO" for r in caplog.records)


def test_another_address_only_when_named_and_then_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"serve_status_page: host .* names no address; use '127.0.0.1'"):
            serve_status_page(hostile_snapshot, empty)
    with pytest.raises(ValueError, match=r"serve_status_page: host 'no-such-host.invalid' cannot be resolved"):
        serve_status_page(hostile_snapshot, "no-such-host.invalid")
    caplog.set_level(logging.INFO, "prefork.status_page")
    with serve_status_page(hostile_snapshot, "0.0.0.0") as served:
        assert get(f"http://127.0.0.1:{served.port}/status.json", host="evil.example:1")[0] == 200  # asked for: no Host check
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "reachable from other machines" in record.getMessage()


def test_bad_arguments_are_refused_in_one_line() -> None:
    with pytest.raises(TypeError, match="get_status must be callable, not dict"):
        serve_status_page(hostile_snapshot())  # type: ignore[arg-type]
    for bad in (-1, 65536, "80", True):
        with pytest.raises(ValueError, match=r"serve_status_page: port = .* must be an integer from 0 to 65535"):
            serve_status_page(hostile_snapshot, port=bad)  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"serve_status_page: cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve_status_page(hostile_snapshot, port=port)


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere() -> None:
    reason = missing_browser(lambda name: None if name == "chromedriver" else f"/usr/bin/{name}")
    assert reason == "no headless browser: chromedriver missing (apt-get install chromium chromium-driver)"
    with pytest.raises(pytest.fail.Exception, match="CI=true, so the status page must be tested"):
        need_browser(reason, {"CI": "true"})
    with pytest.raises(pytest.skip.Exception, match="chromedriver missing"):
        need_browser(reason, {})
    need_browser(None, {"CI": "true"})  # a browser: nothing to say
