"""The WSGI application bench_serve.py runs under ``prefork serve --wsgi`` and gunicorn.

    GET /      HELLO, 100 bytes of text/plain: the cost of the server itself
    GET /cpu   about 2 ms of pure-Python CPU work (``CPU_LOOPS`` turns of a loop),
               then its result as text: a request that keeps a worker busy
    anything else: 404

Both servers import this same module (``benchmarks._wsgi_bench_app:app``, from
the repository's root), so they run the same code per request; the module does
nothing at import but define it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

#: the body of GET /: 100 bytes
HELLO = (b"Hello from the WSGI benchmark app. " * 3)[:99] + b"\n"
#: turns of cpu_work() per GET /cpu: about 2 ms of CPython 3.11 on the machine the benchmark was written on
CPU_LOOPS = 30_000

_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]


def cpu_work(loops: int = CPU_LOOPS) -> int:
    """A loop the interpreter cannot skip; its result depends on every turn."""
    acc = 0
    for i in range(loops):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def cpu_body(loops: int = CPU_LOOPS) -> bytes:
    """What GET /cpu answers (the benchmark checks it before measuring)."""
    return f"cpu_work({loops}) = {cpu_work(loops)}\n".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/":
        start_response("200 OK", _HEADERS)
        return [HELLO]
    if path == "/cpu":
        body = cpu_body()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    body = b"not found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
