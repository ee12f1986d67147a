"""Hostile input at the XML-RPC front, the resolvers and the config files.

Each test is an attack an outsider tried: calling a special method over
XML-RPC, importing a private function by name, holding connections half-open,
and config files nested thousands deep or tens of megabytes large.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

import prefork
from prefork import Dispatcher, XMLRPCFront
from prefork.config import load_config
from prefork.errors import ConfigError
from prefork.strategies.resolver import ChainResolver, ClassesResolver, ImportResolver, MethodsResolver, is_private
from prefork.testing import wait_until

MARKER: list[str] = []


def add(sender: Any, a: int, b: int) -> int:
    return a + b


def precall(sender: Any, *args: Any) -> None:
    pass


class Handlers:
    @staticmethod
    def _secret(sender: Any) -> str:
        return "secret"

    @staticmethod
    def public(sender: Any) -> str:
        return "public"


# -- names that start with "_" are never dispatched, by any resolver, from any front ------


@pytest.mark.parametrize(
    ("name", "private"),
    [("_precall", True), ("os:_exit", True), ("builtins:__import__", True), ("x.__class__", True),
     ("pkg._internal:f", True), ("math:sqrt", False), ("add", False), ("a.b", False)],
)
def test_private_names(name: str, private: bool) -> None:
    assert is_private(name) is private


def test_no_resolver_hands_out_a_private_name() -> None:
    assert MethodsResolver({"_precall": precall}).resolve("_precall") is None
    assert ClassesResolver((Handlers,)).resolve("_secret") is None
    assert ImportResolver().resolve("os:_exit") is None
    assert ImportResolver().resolve("builtins:__import__") is None
    chain = ChainResolver(methods={"_precall": precall}, classes=(Handlers,))
    assert chain.resolve("_precall") is None and chain.resolve("os:_exit") is None
    assert chain.resolve("public") is Handlers.public


def test_xmlrpc_clients_cannot_call_special_or_private_methods() -> None:
    methods = {"add": add, "_precall": precall}
    with Dispatcher(methods=methods, classes=[Handlers], max_forks=1) as d, XMLRPCFront(d) as front:
        proxy = xmlrpc.client.ServerProxy(front.url, allow_none=True)
        assert proxy.add(2, 3) == 5
        for name in ("_precall", "_secret", "os:_exit", "builtins:__import__"):
            with pytest.raises(xmlrpc.client.Fault, match="never dispatched"):
                getattr(proxy, name)()
        assert proxy.public() == "public"


def test_an_executor_refuses_private_names_too() -> None:
    with prefork.Executor(1) as ex:
        exc = ex.submit("os:_exit", 3).exception(timeout=10)  # type: ignore[arg-type]
        assert isinstance(exc, prefork.MethodNotFound) and "never dispatched" in str(exc)
        assert ex.submit("operator:neg", 3).result(timeout=10) == -3  # type: ignore[arg-type]


# -- the XML-RPC front bounds its connections ---------------------------------------------


def _open_half(url_port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", url_port), timeout=5)
        s.sendall(b"POST /RPC2 HTTP/1.0\r\nContent-Length: 1000\r\n")  # and then nothing
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_half_open_connections_are_cut_off_and_bounded() -> None:
    with Dispatcher(methods={"add": add}, max_forks=1) as d, XMLRPCFront(d, read_timeout=0.5, max_connections=3) as front:
        port = front.server.server_address[1]
        threads_before = threading.active_count()
        idle = _open_half(port, 3)
        extra = _open_half(port, 5)  # past max_connections: refused at once, no thread for them
        try:
            for s in extra:
                assert _closed_by_peer(s, 5), "a connection past max_connections was kept"
            assert threading.active_count() <= threads_before + 3 + 3  # handler threads and their deadline timers
            for s in idle:
                assert _closed_by_peer(s, 5), "a half-open connection was kept past read_timeout"
        finally:
            for s in idle + extra:
                s.close()
        proxy = xmlrpc.client.ServerProxy(front.url)
        assert wait_until(lambda: _try(proxy.add, 1, 2) == 3, timeout=5)


def _try(call: Any, *args: Any) -> Any:
    """The call's answer, or None while the server still refuses (its slots are freeing)."""
    try:
        return call(*args)
    except (OSError, xmlrpc.client.ProtocolError):
        return None


def test_a_trickling_client_is_cut_off_at_the_deadline_and_others_are_served() -> None:
    with Dispatcher(methods={"add": add}, max_forks=1) as d, XMLRPCFront(d, read_timeout=0.6, max_connections=4) as front:
        port = front.server.server_address[1]
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        try:
            s.sendall(b"POST /RPC2 HTTP/1.0\r\n")
            cut = False
            while time.monotonic() - t0 < 5:
                try:
                    s.sendall(b"X-Slow: 1\r\n")  # a header every 0.1 s: never idle, never done
                except OSError:
                    cut = True
                    break
                if _closed_by_peer(s, 0.1):
                    cut = True
                    break
            assert cut and time.monotonic() - t0 < 3
            assert xmlrpc.client.ServerProxy(front.url).add(2, 2) == 4
        finally:
            s.close()


def test_front_options_are_checked() -> None:
    with Dispatcher(methods={"add": add}, max_forks=0) as d:
        with pytest.raises(ValueError, match="read_timeout"):
            XMLRPCFront(d, read_timeout=0)
        with pytest.raises(ValueError, match="max_connections"):
            XMLRPCFront(d, max_connections=0)


# -- config files: deep, huge, broken: one line each ----------------------------------------


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "prefork.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "prefork", "check", "-c", str(path)], capture_output=True, text=True, timeout=60,
    )


def test_a_config_nested_thousands_deep_is_one_clear_line(tmp_path: Path) -> None:
    for text in ("x = " + "[" * 5000 + "]" * 5000 + "\n", "a = " + "{ b = " * 3000 + "1" + " }" * 3000 + "\n"):
        done = _check(tmp_path, text)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "prefork.toml" in lines[0] and "nested" in lines[0], done.stderr


def test_a_config_nested_past_the_limit_but_parseable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        path = tmp_path / "deep.toml"
        path.write_text("x = " + "[" * 40 + "]" * 40 + "\n")
        load_config(path)


def test_a_huge_config_is_refused_quickly_with_one_line(tmp_path: Path) -> None:
    t0 = time.monotonic()
    done = _check(tmp_path, 'name = "' + "x" * 50_000_000 + '"\n')
    assert time.monotonic() - t0 < 10
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "larger than 1024 KiB" in lines[0], done.stderr


def test_set_values_nested_deep_do_not_crash_the_command(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text('profile = "executor"\n')
    done = subprocess.run(
        [sys.executable, "-m", "prefork", "check", "-c", str(tmp_path / "prefork.toml"),
         "--set", "pool.task_timeout=" + "[" * 5000],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _post(port: int, body: bytes, length: int | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = f"POST /RPC2 HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
        s.sendall(head.encode() + body)
        chunks = []
        while True:
            got = s.recv(65536)
            if not got:
                return b"".join(chunks)
            chunks.append(got)


def test_malformed_xml_billion_laughs_and_huge_bodies_are_refused_and_the_front_serves_on() -> None:
    laughs = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
              + b"".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode() for i in range(9))
              + b']><methodCall><methodName>add</methodName><params><param><value><string>&j;</string></value></param>'
              b"</params></methodCall>")
    with Dispatcher(methods={"add": add}, max_forks=1) as d, XMLRPCFront(d, max_body=1 << 20) as front:
        port = front.server.server_address[1]
        t0 = time.monotonic()
        assert b"faultCode" in _post(port, b"<methodCall><methodName>add</methodName><params><param>")
        answer = _post(port, laughs)
        assert b"faultCode" in answer or answer.startswith(b"HTTP/1.0 500")
        assert _post(port, b"x" * 100, length=100 * 2**20).startswith(b"HTTP/1.0 413")  # refused before reading
        assert time.monotonic() - t0 < 5
        assert xmlrpc.client.ServerProxy(front.url).add(1, 1) == 2
