"""A WSGI application for `prefork serve` (docs/profiles/mpm.md, "WSGI").

From this directory: prefork serve --wsgi wsgi_hello:app --set mpm.bind=127.0.0.1:8000
"""

import os


def app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        received = 0
        while chunk := environ["wsgi.input"].read(65536):  # streamed: the body is never whole in memory
            received += len(chunk)
        body = f"{received} bytes received\n"
    else:
        body = f"Hello from worker {os.getpid()}: you asked for {environ['PATH_INFO']}\n"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]
