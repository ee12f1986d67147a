"""`prefork serve` with a WSGI app (``mpm.wsgi``): real servers, real clients (http.client,
urllib, curl), raw sockets for what clients never send, real signals; and, in-process, the
handler fed mutated requests by hypothesis."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prefork._control_client import fetch_status
from prefork._wsgi import make_handler
from prefork.config import load_config
from prefork.config.model import MPMConfig
from prefork.errors import ConfigError
from prefork.serve import serve
from prefork.testing import descendants, pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "profiles" / "mpm.md").read_text()
_names = itertools.count()

APP = r'''
import json, os, signal, sys

DIR = os.environ["WSGI_TEST_DIR"]
NOT_CALLABLE = 42


def mark(name):
    open(os.path.join(DIR, name), "w").close()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Closing:
    """A body whose close() leaves a mark; it raises at block ``fail_at``."""
    def __init__(self, blocks, name, fail_at=-1):
        self.blocks, self.name, self.fail_at = blocks, name, fail_at
    def __iter__(self):
        for i, block in enumerate(self.blocks):
            if i == self.fail_at:
                raise RuntimeError("failed while streaming")
            yield block
    def close(self):
        mark(self.name)


def reply(start_response, body, status="200 OK", headers=()):
    start_response(status, [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid())), *headers])
    return [body]


def app(environ, start_response):
    path, inp = environ["PATH_INFO"], environ["wsgi.input"]
    if path.startswith("/environ"):
        env = {k: v for k, v in environ.items() if isinstance(v, (str, bool, tuple))}
        env["input"], env["errors"] = hasattr(inp, "read"), environ["wsgi.errors"] is sys.stderr
        return reply(start_response, json.dumps(env).encode())
    if path == "/echo":
        return reply(start_response, inp.read())
    if path == "/lines":
        first, part, rest = inp.readline(), inp.readline(3), inp.readline()
        lines = inp.readlines() if environ["QUERY_STRING"] == "readlines" else list(inp)
        after = [inp.read(), inp.read(10), inp.readline()]
        return reply(start_response, json.dumps([x.decode() for x in [first, part, rest, *lines, *after]]).encode())
    if path == "/count":
        before = peak = rss()
        size = 0
        while chunk := inp.read(65536):
            size += len(chunk)
            if size % (64 * 65536) == 0:
                peak = max(peak, rss())
        return reply(start_response, json.dumps({"size": size, "grew": max(peak, rss()) - before}).encode())
    if path == "/wait-body":  # says it is in the request, then waits for the body
        mark("waiting-%d" % os.getpid())
        return reply(start_response, inp.read())
    if path == "/boom":
        raise RuntimeError("boom before start_response")
    if path == "/boom-gen":
        return boom_gen(start_response)
    if path == "/boom-late":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing([b"first block\n", b"never"], "closed-late", fail_at=1)
    if path == "/generator":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return generator(environ["QUERY_STRING"], int(environ.get("HTTP_X_BLOCKS", "2")))
    if path == "/gen":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closing([b"a", b"", b"b"], "closed-" + environ["QUERY_STRING"])
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"and returned"]
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Oops", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"handled"]
    if path == "/exc-info-late":
        return exc_info_late(start_response)
    if path == "/bad-header":
        return reply(start_response, b"x", headers=[("Transfer-Encoding", "gzip")])
    if path == "/injected-header":  # a value with CR LF: it must not become a header of its own
        return reply(start_response, b"x", headers=[("X-Name", "a\r\nSet-Cookie: stolen=1")])
    if path.startswith("/length-"):  # a Content-Length the body does not keep: too much, or too little
        start_response("200 OK", [("Content-Length", "10")])
        return Closing([b"0123456789abc" if path == "/length-much" else b"012"], "closed-" + path[1:])
    if path == "/no-content":  # 204 and 304 have no body, whatever the app declares
        code = environ["QUERY_STRING"] or "204"
        start_response(code + " X", [("X-Code", code)] + ([("Content-Length", "7")] if code == "304" else []))
        return [b"not allowed"] if environ.get("HTTP_X_BODY") else iter([b""])
    if path == "/bad-name":  # a name with a colon and a space: it must not become a header of its own
        return reply(start_response, b"x", headers=[("Set-Cookie: stolen=1\r\nX", "v")])
    if path == "/file":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](open(__file__, "rb"))
    if path == "/str":
        start_response("200 OK", [])
        return ["not bytes"]
    return reply(start_response, ("hello %s" % path).encode())


def generator(name, blocks):
    try:
        for i in range(blocks):
            yield b"%d" % i * 65536
    finally:  # runs when the server calls close()
        mark("closed-" + name)


def boom_gen(start_response):
    start_response("200 OK", [])
    raise RuntimeError("boom in a generator, before its first block")
    yield b""


def exc_info_late(start_response):
    start_response("200 OK", [])
    yield b"first\n"
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Oops", [], sys.exc_info())
    yield b"never"
'''


class Server:
    """`prefork serve --wsgi` in a subprocess, its JSON log in a file."""

    def __init__(self, directory: Path, *settings: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "wsgiapp.py").write_text(APP)
        self.dir = directory
        self.log = directory / "server.log"
        self.name = f"wsgi-test-{os.getpid()}-{next(_names)}"
        cmd = [sys.executable, "-m", "prefork", "serve", "--log-format", "json", "--set", "mpm.wsgi=wsgiapp:app",
               "--set", "mpm.bind=127.0.0.1:0", "--set", f'name="{self.name}"', *settings]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=directory, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), "WSGI_TEST_DIR": str(directory)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the server prints it or exits
        if "listening on" not in line:
            self.stop()
            pytest.fail(f"prefork serve did not start: {line!r}\n{self.log.read_text()}")
        self.port = int(line.rsplit(":", 1)[1])

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["level"] == "ERROR"]

    def workers(self) -> set[int]:
        return {pid for pid in descendants(self.proc.pid) if _cmdline(pid) == f"{self.name} worker"}

    def connect(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def stop(self) -> None:
        every = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"prefork serve ignored SIGTERM\n{self.log.read_text()}") from None
        assert code == 0, self.log.read_text()
        wait_until(lambda: not any(pid_alive(p) for p in every), timeout=10, what="the server's children to go")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


#: a fixed number of children: a module-wide server forks none during a test (the leak check)
FIXED = ("--set", "scaling.name=fixed", "--set", "scaling.workers=3")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("wsgi"), *FIXED, "--set", "mpm.keepalive_timeout=2")
    wait_until(lambda: len(srv.workers()) == 3, what="three children")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("strict"), *FIXED, "--set", "mpm.max_body=100000",
                 "--set", "mpm.header_timeout=2", "--set", "mpm.keepalive_timeout=0.5", "--set", "mpm.read_timeout=1")
    wait_until(lambda: len(srv.workers()) == 3, what="three children")
    yield srv
    srv.stop()


def get(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
        headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response, response.read()


def raw(sock: socket.socket, data: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send ``data``, read one response with http.client's parser; the status, headers, body."""
    sock.sendall(data)
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def until_closed(sock: socket.socket) -> bytes:
    """What the server still sends until it closes (the socket's timeout bounds each wait)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


# -- keep-alive ------------------------------------------------------------------------------------------


def test_one_connection_carries_several_requests_to_one_child(server: Server) -> None:
    conn = server.http()
    try:
        pids = set()
        for i in range(4):
            status, response, body = get(conn, "GET", f"/n{i}")
            assert (status, body) == (200, f"hello /n{i}".encode())
            assert response.getheader("Connection") is None
            pids.add(response.getheader("X-Pid"))
        assert len(pids) == 1 and int(pids.pop() or 0) in server.workers()
    finally:
        conn.close()


def test_connection_close_and_http_1_0_end_the_connection_after_the_response(server: Server) -> None:
    with server.connect() as sock:
        status, headers, body = raw(sock, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (status, headers["connection"], body) == (200, "close", b"hello /a")
        assert until_closed(sock) == b""
    with server.connect() as sock:
        sock.sendall(b"GET /gen?http10 HTTP/1.0\r\n\r\n")
        answer = until_closed(sock)  # no length, not chunked (1.0): the body ends with the connection
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nab"), answer
        assert b"chunked" not in answer.lower()


def test_a_connection_close_request_frees_its_child_without_waiting_for_the_clients_fin(tmp_path: Path) -> None:
    """A bodiless request answered with Connection: close is read to its end: the child
    closes at once and takes the next connection.  It used to linger (shut its side,
    wait up to 2 s for the client to close), so one client that kept its socket open
    after the response held the only child for 2 s."""
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=1")
    try:
        wait_until(lambda: len(srv.workers()) == 1, what="one child")
        with srv.connect() as first:
            status, headers, _ = raw(first, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (status, headers["connection"]) == (200, "close")
            assert until_closed(first) == b""  # our side stays open from here on
            with srv.connect() as second:
                t0 = time.monotonic()
                status, _, body = raw(second, b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                waited = time.monotonic() - t0
            assert (status, body) == (200, b"hello /b")
            assert waited < 1.0, f"the only child answered the next client after {waited:.2f} s (it lingered)"
    finally:
        srv.stop()


def test_close_is_a_token_of_the_connection_header_not_a_substring(server: Server) -> None:
    with server.connect() as sock:  # "close" among other tokens: the last request
        status, headers, _ = raw(sock, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n")
        assert (status, headers["connection"]) == (200, "close")
        assert until_closed(sock) == b""
    with server.connect() as sock:  # no close token: the connection carries the next request
        status, headers, _ = raw(sock, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: closely\r\n\r\n")
        assert status == 200 and "connection" not in headers
        status, _, body = raw(sock, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body) == (200, b"hello /b")


def test_a_connection_header_without_the_close_token_still_yields_to_a_waiting_client(tmp_path: Path) -> None:
    """A client that says close needs no look at the listen queue (its connection ends
    anyway); one whose Connection header merely contains the letters must still get
    Connection: close while another client waits for the only child."""
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=1")
    try:
        wait_until(lambda: len(srv.workers()) == 1, what="one child")
        with srv.connect() as first:
            assert raw(first, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # the child keeps it open
            with srv.connect() as second:  # queued: the only child waits on the first connection
                status, headers, _ = raw(first, b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: closely\r\n\r\n")
                assert (status, headers.get("connection")) == (200, "close")
                status, _, body = raw(second, b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (status, body) == (200, b"hello /3")
    finally:
        srv.stop()


def test_a_response_to_a_body_still_coming_is_read_whole_not_lost_to_a_reset(server: Server) -> None:
    """The app answers without reading a 4 MiB body.  The child then shuts its side and
    reads what the client still sends before closing: a close with unread bytes would
    send a reset, and a reset makes the client's kernel drop the answer it holds."""
    body = b"x" * (4 << 20)
    head = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    for _ in range(3):
        with server.connect() as sock:
            sock.sendall(head + body[: 256 << 10])
            status, headers, answer = raw(sock, b"")  # the answer comes before the body is all sent
            assert (status, headers["connection"], answer) == (200, "close", b"hello /a")
            try:
                sock.sendall(body[256 << 10 :])  # the child reads it out (or has closed after 2 s: then a reset)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sock.shutdown(socket.SHUT_WR)
            assert until_closed(sock) == b""


def test_two_pipelined_requests_get_two_responses_in_order(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = until_closed(sock)
    assert answer.count(b"HTTP/1.1 200") == 2
    assert answer.index(b"hello /one") < answer.index(b"hello /two")


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(strict: Server) -> None:
    with strict.connect() as sock:
        assert raw(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        t0 = time.monotonic()
        assert until_closed(sock) == b""
        assert 0.3 < time.monotonic() - t0 < 3  # keepalive_timeout = 0.5


def test_keepalive_timeout_0_serves_one_request_per_connection() -> None:
    with handler_thread(MPMConfig(keepalive_timeout=0)) as client:
        status, headers, body = raw(client, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers["connection"], body) == (200, "close", b"")
        assert until_closed(client) == b""


def test_a_child_leaves_after_max_tasks_per_child_requests_once_the_last_response_is_whole(
        tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=1",
                 "--set", "pool.max_tasks_per_child=3", "--set", "mpm.keepalive_timeout=30")
    try:
        conn = srv.http()
        pids = [get(conn, "GET", f"/{i}")[1].getheader("X-Pid") for i in range(3)]  # each read whole
        assert len(set(pids)) == 1
        first = int(pids[0] or 0)
        wait_until(lambda: not pid_alive(first), what="the child to leave after its third request")
        conn.close()
        conn = srv.http()
        assert int(get(conn, "GET", "/")[1].getheader("X-Pid") or 0) not in (0, first)  # its replacement
        conn.close()
    finally:
        srv.stop()


# -- the environ ---------------------------------------------------------------------------------------


def test_the_environ_has_every_key_pep_3333_asks_for(server: Server) -> None:
    conn = server.http()
    try:
        conn.putrequest("POST", "/environ/p%C3%A9th/x%2Fy?q=1&r=%20")
        for name, value in [("X-Multi", "a"), ("X-Multi", "b"), ("Content-Type", "text/x-test"),
                            ("Content-Length", "2"), ("Cookie", "a=1"), ("Cookie", "b=2")]:
            conn.putheader(name, value)
        conn.endheaders(b"hi")
        response = conn.getresponse()
        env = json.loads(response.read())
        local_port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    assert env["REQUEST_METHOD"] == "POST" and env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/environ/p\xc3\xa9th/x/y"  # percent-decoded, each byte one latin-1 character
    assert env["QUERY_STRING"] == "q=1&r=%20"
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["SERVER_PROTOCOL"]) == ("127.0.0.1", str(server.port),
                                                                                 "HTTP/1.1")
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("127.0.0.1", str(local_port))
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"]) == ("text/x-test", "2")
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_X_MULTI"] == "a,b" and env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["HTTP_HOST"] == f"127.0.0.1:{server.port}"
    assert env["wsgi.version"] == [1, 0] and env["wsgi.url_scheme"] == "http"
    assert (env["wsgi.multithread"], env["wsgi.multiprocess"], env["wsgi.run_once"]) == (False, True, False)
    assert env["input"] and env["errors"]


def test_server_name_is_each_connections_own_address_when_bound_to_every_address(tmp_path: Path) -> None:
    """Bound to one address, a child reads SERVER_NAME/PORT once from the listener; bound
    to 0.0.0.0 it must not: each connection has its own local address (127.0.0.2 here)."""
    srv = Server(tmp_path, *FIXED, "--set", "mpm.bind=0.0.0.0:0")
    try:
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
            with socket.create_connection((host, srv.port), timeout=10) as sock:
                status, _, body = raw(sock, b"GET /environ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            env = json.loads(body)
            assert (status, env["SERVER_NAME"], env["SERVER_PORT"]) == (200, host, str(srv.port))
    finally:
        srv.stop()


def test_urllib_gets_and_posts(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(f"{base}/from-urllib", timeout=10) as response:
        assert response.read() == b"hello /from-urllib"
    with urllib.request.urlopen(urllib.request.Request(f"{base}/echo", data=b"posted"), timeout=10) as response:
        assert response.read() == b"posted"


def test_a_header_name_with_an_underscore_is_refused_400(server: Server) -> None:
    with server.connect() as sock:
        status, _, body = raw(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n")
    assert status == 400 and b"'x_forwarded_for' has '_'" in body


# -- request bodies -------------------------------------------------------------------------------------


def test_content_length_and_chunked_bodies_reach_the_app(server: Server) -> None:
    conn = server.http()
    try:
        assert get(conn, "POST", "/echo", b"x" * 100_000)[2] == b"x" * 100_000
        chunks = iter([b"first,", b"", b"second,", b"third" * 10_000])
        status, _, body = get(conn, "POST", "/echo", chunks)  # http.client sends an iterable chunked
        assert (status, body) == (200, b"first,second," + b"third" * 10_000)
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["iteration", "readlines"])
def test_wsgi_input_reads_lines_and_gives_empty_bytes_past_the_body(server: Server, how: str) -> None:
    conn = server.http()
    try:
        body = b"one\nthree-four\nfive\nsix"
        chunked = iter([body[:5], body[5:12], body[12:]])  # lines cut across chunks
        _, _, answer = get(conn, "POST", f"/lines?{how}", chunked)  # http.client sends an iterable chunked
    finally:
        conn.close()
    assert json.loads(answer) == ["one\n", "thr", "ee-four\n", "five\n", "six", "", "", ""]


def test_expect_100_continue_is_answered_when_the_app_reads_the_body(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):  # a client that waits for the 100 before its body
            chunk = sock.recv(100)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 ")
        status, _, body = raw(sock, b"hello")
        assert (status, body) == (200, b"hello")
    with server.connect() as sock:  # an app that never reads: no 100, and the connection closes
        status, headers, body = raw(sock, b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                          b"Content-Length: 5\r\n\r\n")
        assert (status, headers["connection"], body) == (200, "close", b"hello /x")


def test_a_50_mb_upload_streams_through_wsgi_input_without_the_child_holding_it(server: Server) -> None:
    conn = server.http()
    try:
        block = b"u" * 2**20
        status, _, body = get(conn, "POST", "/count", iter([block] * 50), {"Content-Length": str(50 * 2**20)})
    finally:
        conn.close()
    assert status == 200
    report = json.loads(body)
    assert report["size"] == 50 * 2**20
    assert report["grew"] < 8 * 2**20, report  # a few buffers of 64 KiB, not the body


def test_a_body_over_max_body_is_answered_413_declared_or_streamed(strict: Server) -> None:
    with strict.connect() as sock:  # declared: refused before the app and before any 100
        status, headers, body = raw(sock, b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                          b"Content-Length: 200000\r\n\r\n")
        assert status == 413 and headers["connection"] == "close"
        assert b"more than mpm.max_body = 100000" in body
    conn = strict.http()
    try:  # chunked: found out as it streams
        status, _, body = get(conn, "POST", "/echo", iter([b"z" * 30_000] * 5))
        assert status == 413 and b"longer than mpm.max_body = 100000" in body
    finally:
        conn.close()
    assert not strict.errors()


# -- responses --------------------------------------------------------------------------------------------


def test_head_sends_the_headers_of_get_and_no_body(server: Server) -> None:
    conn = server.http()
    try:
        _, got, body = get(conn, "GET", "/same")
        status, head, nothing = get(conn, "HEAD", "/same")
        assert (status, nothing) == (200, b"")
        assert head.getheader("Content-Length") == got.getheader("Content-Length") == str(len(body))
        _, again, body = get(conn, "GET", "/after-head")  # no stray body bytes on the connection
        assert body == b"hello /after-head" and again.getheader("X-Pid") == got.getheader("X-Pid")
    finally:
        conn.close()


def test_a_generator_body_is_chunked_and_closed(server: Server) -> None:
    conn = server.http()
    try:
        status, response, body = get(conn, "GET", "/gen?chunked")
        assert (status, body) == (200, b"ab")
        assert response.getheader("Transfer-Encoding") == "chunked"
        get(conn, "HEAD", "/gen?head")
    finally:
        conn.close()
    wait_until(lambda: (server.dir / "closed-chunked").exists() and (server.dir / "closed-head").exists(),
               what="close() of both bodies")


def test_a_generator_is_closed_after_its_response_and_when_its_client_went_away(server: Server) -> None:
    conn = server.http()
    try:
        status, _, body = get(conn, "GET", "/generator?whole")
        assert (status, body) == (200, b"0" * 65536 + b"1" * 65536)
    finally:
        conn.close()
    wait_until(lambda: (server.dir / "closed-whole").exists(), what="close() of the whole body")
    with server.connect() as sock:  # 64 MB the client never reads: it reads the status line and goes
        sock.sendall(b"GET /generator?gone HTTP/1.1\r\nHost: x\r\nX-Blocks: 1000\r\n\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"
    wait_until(lambda: (server.dir / "closed-gone").exists(), what="close() of the body whose client went away")
    assert not [r for r in server.errors() if "/generator" in r["message"]]


def test_a_body_longer_than_its_content_length_never_reaches_the_client(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /length-much HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = until_closed(sock)
    assert b"abc" not in answer and b"0123456789" not in answer  # no byte past the length, nor a bogus 200
    record = _one_error(server, "/length-much")
    assert "the response had begun: the connection is closed" in record["message"]
    assert "Content-Length" in record["exc_info"]
    wait_until(lambda: (server.dir / "closed-length-much").exists(), what="close() of the body")


def test_a_body_shorter_than_its_content_length_closes_the_connection_and_is_logged(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /length-little HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = until_closed(sock)  # the client sees 3 of 10 bytes, then the end: a body cut short
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 10" in head.lower() and body == b"012"
    assert "Content-Length" in _one_error(server, "/length-little")["exc_info"]


@pytest.mark.parametrize("code", ["204", "304"])
def test_204_and_304_carry_no_body_and_keep_the_connection(server: Server, code: str) -> None:
    with server.connect() as sock:
        request = f"GET /no-content?{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for _ in range(2):  # the second answer on the same connection: no stray bytes between them
            status, headers, body = raw(sock, request)
            assert (status, headers["x-code"], body) == (int(code), code, b"")
            assert "transfer-encoding" not in headers and "connection" not in headers
        assert headers.get("content-length") == ("7" if code == "304" else None)


def test_a_body_given_with_204_is_the_apps_error(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /no-content HTTP/1.1\r\nHost: x\r\nX-Body: 1\r\n\r\n")
        answer = until_closed(sock)
    assert b"not allowed" not in answer
    assert "the response had begun: the connection is closed" in _one_error(server, "/no-content")["message"]


def test_an_http_1_0_client_gets_a_body_of_unknown_length_delimited_by_the_close(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /generator?old HTTP/1.0\r\n\r\n")
        answer = until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == b"0" * 65536 + b"1" * 65536
    wait_until(lambda: (server.dir / "closed-old").exists(), what="close() of the body")


def test_write_and_a_returned_list_make_one_body(server: Server) -> None:
    conn = server.http()
    try:
        status, _, body = get(conn, "GET", "/write")
        assert (status, body) == (200, b"written, and returned")
    finally:
        conn.close()


def test_the_file_wrapper_sends_the_whole_file(server: Server) -> None:
    conn = server.http()
    try:
        status, response, body = get(conn, "GET", "/file")
    finally:
        conn.close()
    assert (status, body) == (200, (server.dir / "wsgiapp.py").read_bytes())
    assert response.getheader("Transfer-Encoding") == "chunked"  # blocks of 8192 bytes, as they are read


def test_start_response_with_exc_info_replaces_headers_not_yet_sent(server: Server) -> None:
    conn = server.http()
    try:
        status, response, body = get(conn, "GET", "/exc-info")
        assert (status, response.reason, body) == (503, "Oops", b"handled")
    finally:
        conn.close()


# -- the app fails --------------------------------------------------------------------------------------


def _one_error(srv: Server, path: str) -> dict[str, Any]:
    found = wait_until(lambda: [r for r in srv.errors() if f" {path} " in r["message"]], what=f"the log of {path}")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(("path", "error"), [("/boom", "RuntimeError: boom before start_response"),
                                              ("/boom-gen", "RuntimeError: boom in a generator"),
                                              ("/bad-header", "'Transfer-Encoding' is a hop-by-hop header"),
                                              ("/injected-header", "ValueError: start_response: header 'X-Name' has a value a field may not hold"),
                                              ("/bad-name", "ValueError: start_response: header name "),
                                              ("/str", "TypeError: the WSGI app gave str as body, not bytes")])
def test_an_app_that_raises_before_its_headers_are_sent_gets_a_500_and_one_log_record(
        server: Server, path: str, error: str) -> None:
    with server.connect() as sock:
        status, headers, body = raw(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (status, headers["connection"]) == (500, "close")
        assert b"Traceback" not in body and "set-cookie" not in headers
    record = _one_error(server, path)
    assert record["logger"] == "prefork.serve" and record["method"] == "GET" and record["path"] == path
    assert "answered 500" in record["message"]
    assert error in record["exc_info"] and record["exc_info"].startswith("Traceback")


@pytest.mark.parametrize(("path", "error"), [("/boom-late", "RuntimeError: failed while streaming"),
                                              ("/exc-info-late", "ValueError: too late")])
def test_an_app_that_raises_after_its_headers_went_out_has_its_connection_closed(
        server: Server, path: str, error: str) -> None:
    with server.connect() as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"first" in answer
    assert not answer.endswith(b"0\r\n\r\n")  # no chunked end: the client knows the body is cut short
    record = _one_error(server, path)
    assert "the response had begun: the connection is closed" in record["message"] and error in record["exc_info"]
    if path == "/boom-late":
        wait_until(lambda: (server.dir / "closed-late").exists(), what="close() of the failed body")


# -- malformed and hostile requests ----------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "status", "why"), [
    (b"\x00\xffgarbage\x01\r\n\r\n", 400, b"malformed request"),
    (b"GET /\r\nHost: x\r\n\r\n", 400, b"malformed request"),  # no version
    (b"GET / HTTP/1.1\r\n\r\n", 400, b"Host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, b"mpm.max_header_bytes = 65536"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n", 431,
     b"201 header fields, more than mpm.max_headers = 100"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400,
     b"malformed request body"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, b"chunked"),
], ids=["garbage", "no-version", "no-host", "70KB-header", "200-headers", "bad-chunk-size", "gzip-encoding"])
def test_a_malformed_request_is_refused_with_its_status_and_the_connection_closed(
        server: Server, request_bytes: bytes, status: int, why: bytes) -> None:
    errors = len(server.errors())
    with server.connect() as sock:
        got, headers, body = raw(sock, request_bytes)
        assert (got, headers["connection"]) == (status, "close"), body
        assert why in body
        assert until_closed(sock) == b""
    assert len(server.errors()) == errors  # a refusal is no application error


def test_a_slowloris_is_answered_408_and_closed_within_header_timeout(strict: Server) -> None:
    with strict.connect() as sock:
        t0 = time.monotonic()
        sent = 0
        for byte in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 100:  # a header byte a second
            sock.sendall(bytes([byte]))
            sent += 1
            if select.select([sock], [], [], 1.0)[0]:  # the server answered (or closed)
                break
        answer = until_closed(sock)
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"mpm.header_timeout = 2 s" in answer
    assert sent >= 2 and 1.8 < elapsed < 4, (sent, elapsed)  # header_timeout = 2


def test_a_body_that_stalls_longer_than_read_timeout_is_answered_408(strict: Server) -> None:
    with strict.connect() as sock:
        t0 = time.monotonic()
        status, headers, body = raw(sock, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf!",
                                    method="POST")
        assert (status, headers["connection"]) == (408, "close") and b"mpm.read_timeout = 1.0 s" in body
        assert 0.8 < time.monotonic() - t0 < 3
    found = wait_until(lambda: [r for r in strict.records() if r["level"] == "WARNING" and "/echo" in r["message"]],
                       what="the warning")
    assert "the client sent nothing for mpm.read_timeout" in found[0]["message"]


def test_a_client_that_sends_nothing_is_closed_after_header_timeout_without_an_answer(strict: Server) -> None:
    with strict.connect() as sock:
        t0 = time.monotonic()
        assert until_closed(sock) == b""
        assert 1.8 < time.monotonic() - t0 < 4


# -- SIGTERM: the response in flight completes, then the child leaves ---------------------------------------


def _state(srv: Server, pid: int) -> str:
    [entry] = [w for w in fetch_status(srv.name)["workers"] if w["pid"] == pid]
    return str(entry["state"])


def _signal_taken(pid: int) -> bool:
    """The kernel has no signal pending for ``pid`` any more (its handler ran)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return all(int(m, 16) == 0 for m in re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M))


def test_sigterm_during_a_request_lets_its_response_complete_then_the_child_leaves(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=2",
                 "--set", "mpm.keepalive_timeout=30")
    try:
        with srv.connect() as sock:
            _, headers, _ = raw(sock, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
            pid = int(headers["x-pid"])
            wait_until(lambda: _state(srv, pid) == "keepalive", what="keepalive between two requests of one connection")
            sock.sendall(b"POST /wait-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            wait_until(lambda: (tmp_path / f"waiting-{pid}").exists(), what="the request in the app")
            assert _state(srv, pid) == "busy"  # in a request: what harakiri (request_timeout) measures
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: _signal_taken(pid), what="the SIGTERM taken")
            status, headers, body = raw(sock, b"hello", method="POST")
            assert (status, body, headers["connection"]) == (200, b"hello", "close")
            assert until_closed(sock) == b""
        wait_until(lambda: not pid_alive(pid), what="the child to leave")
        with srv.connect() as sock:  # its replacement (or the other child) answers
            assert raw(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        assert not srv.errors()
    finally:
        srv.stop()


def test_sigterm_to_a_child_waiting_on_an_idle_keep_alive_connection_closes_it_at_once(tmp_path: Path) -> None:
    srv = Server(tmp_path, "--set", "scaling.name=fixed", "--set", "scaling.workers=2",
                 "--set", "mpm.keepalive_timeout=30")
    try:
        with srv.connect() as sock:
            _, headers, _ = raw(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            pid = int(headers["x-pid"])
            t0 = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            assert until_closed(sock) == b""
            assert time.monotonic() - t0 < 5  # not keepalive_timeout = 30
        wait_until(lambda: not pid_alive(pid), what="the child to leave")
    finally:
        srv.stop()


# -- configuration ----------------------------------------------------------------------------------------


def test_app_and_mpm_wsgi_both_set_is_refused_in_one_line_naming_both(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "prefork", "serve", "--set", "app=x:handle",
                          "--set", "mpm.wsgi=wsgiapp:app", "--set", "mpm.bind=127.0.0.1:0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "listening" not in out.stdout
    assert out.stderr.strip() == (
        "prefork: error: keyword arguments: app = 'x:handle' and keyword arguments: mpm.wsgi = 'wsgiapp:app' are "
        "both set: prefork serve runs handle(conn, addr) or a WSGI app, not both; unset one")


@pytest.mark.parametrize(("spec", "reason"), [("no_such_module_here:app", "cannot import it: No module named"),
                                              ("wsgiapp:missing", "cannot import it:"),
                                              ("wsgiapp:NOT_CALLABLE", "int is not callable; prefork serve calls "
                                                                       "app(environ, start_response)")])
def test_a_wsgi_app_that_cannot_be_used_is_a_config_error(spec: str, reason: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wsgiapp.py").write_text("NOT_CALLABLE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wsgiapp", None)
    config = load_config(None, {"profile": "mpm", "mpm.wsgi": spec, "mpm.bind": "127.0.0.1:0"})
    with pytest.raises(ConfigError, match=re.escape(f"keyword arguments: mpm.wsgi = {spec!r}: {reason}")):
        serve(config)
    sys.modules.pop("wsgiapp", None)


# -- the docs ------------------------------------------------------------------------------------------------


def blocks(mark: str) -> list[str]:
    return re.findall(rf"<!-- wsgi: {mark} -->\n```\w*\n(.*?)```", DOC, re.S)


def test_the_documented_example_is_examples_wsgi_hello() -> None:
    [app] = blocks("app")
    assert app == (ROOT / "examples" / "wsgi_hello.py").read_text()


def test_the_documented_config_has_every_limit_at_its_default(tmp_path: Path) -> None:
    [toml] = blocks("config")
    (tmp_path / "prefork.toml").write_text(toml)
    mpm = load_config(tmp_path / "prefork.toml").mpm
    assert mpm.wsgi == "wsgi_hello:app"
    for key in ("max_header_bytes", "max_headers", "max_body", "header_timeout", "keepalive_timeout", "read_timeout"):
        assert re.search(rf"^{key} = ", toml, re.M), key
        assert getattr(mpm, key) == getattr(MPMConfig(), key), key


@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented session uses curl")
@pytest.mark.parametrize("how", ["command", "config"])
def test_the_documented_server_answers_the_documented_requests(how: str, tmp_path: Path) -> None:
    if how == "command":
        [command] = blocks("run")
        argv = shlex.split(command.strip().replace("127.0.0.1:8000", "127.0.0.1:0"))
    else:
        [toml] = blocks("config")
        (tmp_path / "prefork.toml").write_text(toml.replace("127.0.0.1:8000", "127.0.0.1:0"))
        argv = ["prefork", "serve", "-c", str(tmp_path / "prefork.toml")]
    assert argv[:2] == ["prefork", "serve"]
    proc = subprocess.Popen([sys.executable, "-m", "prefork", *argv[1:], "--set", f'name="wsgi-doc-{how}-{os.getpid()}"'],
                            cwd=ROOT / "examples", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read() if proc.stderr else ""
        port = line.rsplit(":", 1)[1].strip()
        [session] = blocks("curl")
        for command, expected in re.findall(r"^\$ (.*)\n((?:[^$].*\n)*)", session, re.M):
            out = subprocess.run(command.replace("8000", port), shell=True, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            pattern = re.escape(expected).replace(r"12345", r"\d+")
            assert re.fullmatch(pattern, out.stdout), (command, out.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


# -- in process: whatever bytes arrive, the answer is a refusal or a response, never a crash ---------------


def _echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


class handler_thread:  # a context manager, named like one made with contextlib
    """The WSGI handler on one end of a socket pair, in a thread; the test holds the other end."""

    def __init__(self, cfg: MPMConfig, app: Any = _echo) -> None:
        self.handle = make_handler(app, cfg)
        self.server, self.client = socket.socketpair()
        self.client.settimeout(10)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.handle(self.server, ("127.0.0.1", 4242))
        except BaseException as exc:
            self.failure = exc
        finally:
            self.server.close()

    def __enter__(self) -> socket.socket:
        self.thread.start()
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the handler did not return"
        if self.failure is not None:
            raise self.failure


VALID = [
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\r\n", b":", b" ", b"\x00", b"9" * 12]))
        if kind == "insert":
            data[where:where] = piece
        elif kind == "delete":
            del data[where:where + len(piece)]
        else:
            data[where:where + len(piece)] = piece
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_any_bytes_get_responses_or_a_refusal_and_never_a_500(data: bytes) -> None:
    with handler_thread(MPMConfig(header_timeout=5, read_timeout=5)) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        answer = until_closed(client)
    statuses = [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3}) ", answer, re.M)]
    assert set(statuses) <= {100, 200, 400, 413, 431, 501}, (data, answer)


_REASONS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(str.strip)
_FIELDS = st.lists(st.tuples(st.sampled_from(["X-A", "x-b", "Content-Type", "Set-Cookie", "ETag"]),
                             st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10)), max_size=4)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD"]), version=st.sampled_from(["1.0", "1.1"]),
       code=st.sampled_from([200, 201, 204, 304, 404, 503]), reason=_REASONS, fields=_FIELDS,
       blocks=st.lists(st.binary(max_size=300) | st.integers(10, 70_000).map(lambda n: b"b" * n), max_size=4),
       as_list=st.booleans(), declare=st.booleans(), app_closes=st.booleans())
@example(method="GET", version="1.1", code=200, reason="OK", fields=[], blocks=[b"a" * 20, b"", b"b" * 300],
         as_list=False, declare=False, app_closes=False)  # chunks, one of them empty: sizes that read alike in decimal do not hide
def test_every_response_the_server_frames_parses_back_as_the_app_gave_it(
        method: str, version: str, code: int, reason: str, fields: list[tuple[str, str]], blocks: list[bytes],
        as_list: bool, declare: bool, app_closes: bool) -> None:
    """prefork frames its responses itself (h11 reads requests only): h11's client side,
    reading them back, sees the status, the app's fields in order and the body, whatever the
    method, version, status, body form and length; a second request follows on the same
    connection when both ends keep it."""
    if code in (204, 304):
        blocks = []
    headers = [*fields, *([("Content-Length", str(sum(map(len, blocks))))] if declare else []),
               *([("Connection", "close")] if app_closes else [])]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response(f"{code} {reason}".rstrip(), headers)
        return list(blocks) if as_list else iter(blocks)

    request = f"{method} / HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    with handler_thread(MPMConfig(keepalive_timeout=5), app) as client:
        client.sendall(request * 2)
        client.shutdown(socket.SHUT_WR)
        answer = until_closed(client)
    import h11
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    reader.send(h11.EndOfMessage())
    reader.receive_data(answer)
    reader.receive_data(b"")  # the server closed: the end of a body without a length
    responses = []
    while True:
        event = reader.next_event()
        if isinstance(event, h11.Response):
            body = b""
            while not isinstance(part := reader.next_event(), h11.EndOfMessage):
                body += part.data
            responses.append((event, body))
            if len(responses) < 2 and reader.our_state is h11.DONE and reader.their_state is h11.DONE:
                reader.start_next_cycle()
                reader.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
                reader.send(h11.EndOfMessage())
                continue
        break
    assert responses, answer
    keeps = version == "1.1" and not app_closes
    assert len(responses) == (2 if keeps else 1) and not reader.trailing_data[0], answer  # nothing after a close
    for response, body in responses:
        assert (response.status_code, response.reason) == (code, reason.encode())
        got = [(n.decode(), v.decode()) for n, v in response.headers.raw_items()]
        assert got[:len(headers)] == headers and all(n in ("Content-Length", "Transfer-Encoding", "Connection")
                                                     for n, _ in got[len(headers):]), got
        assert body == (b"" if method == "HEAD" or code in (204, 304) else b"".join(blocks))


def test_an_app_that_says_connection_close_ends_the_connection_after_its_response() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Connection", "Close"), ("Content-Length", "2")])
        return [b"ok"]

    with handler_thread(MPMConfig(keepalive_timeout=5), app) as client:
        client.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = until_closed(client)  # the server closes after the first: the second is never read
    assert answer.count(b"HTTP/1.1 200 ") == 1 and answer.lower().count(b"connection: close") == 1, answer


def test_no_100_continue_goes_out_once_the_response_has_begun() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"first, ")
        return [environ["wsgi.input"].read()]

    with handler_thread(MPMConfig(keepalive_timeout=0.5), app) as client:
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        client.shutdown(socket.SHUT_WR)
        answer = until_closed(client)
    assert b"100 Continue" not in answer and answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.endswith(b"7\r\nfirst, \r\n5\r\nhello\r\n0\r\n\r\n"), answer


def test_a_busy_keep_alive_client_cannot_starve_a_new_one(tmp_path: Path) -> None:
    """One child, one client that keeps its connection busy with request after request: a
    second client is answered anyway, because while a connection waits in the listen queue
    each response says Connection: close (bench_serve.py found new clients never answered)."""
    import threading

    srv = Server(tmp_path / "one", "--set", "scaling.name=fixed", "--set", "scaling.workers=1",
                 "--set", "mpm.keepalive_timeout=30")
    stop = threading.Event()
    answered = [0]

    def busy_client() -> None:
        conn = srv.http()
        while not stop.is_set():
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                answered[0] += 1
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = srv.http()  # closed for the other client: come back
        conn.close()

    hog = threading.Thread(target=busy_client, daemon=True)
    try:
        wait_until(lambda: len(srv.workers()) == 1, what="one child")
        hog.start()
        wait_until(lambda: answered[0] > 50, what="the first client served, over and over")
        other = srv.http()
        other.request("GET", "/")
        assert other.getresponse().status == 200  # within http()'s 10 s timeout: not starved
        other.close()
    finally:
        stop.set()
        hog.join(15)
        srv.stop()
