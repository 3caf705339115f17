"""A loopback HTTP server whose answers are scripted per path, to inject faults into downloads."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send this many body bytes, then reset the connection
    short_by: int = 0  # promise the whole body, send this many bytes less, close cleanly
    ignore_range: bool = False
    delay: float = 0.0  # before the body: a read timeout for the client
    location: str | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class FaultServer:
    def __init__(self) -> None:
        self.routes: dict[str, list[Answer]] = {}
        self.seen: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                return

            def do_GET(self) -> None:  # the http.server API names it
                server.seen.append(Seen(self.path, dict(self.headers.items())))
                script = server.routes.get(self.path.split("?")[0]) or [Answer(404, b"not found")]
                answer = script.pop(0) if len(script) > 1 else script[0]
                # The client may give up first: timeouts are among the faults under test.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer(answer)

            def _answer(self, a: Answer) -> None:
                body, status, extra = a.body, a.status, dict(a.headers)
                match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match and status == 200 and not a.ignore_range:
                    start = int(match.group(1))
                    extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    body, status = body[start:], 206
                self.send_response(status)
                if a.location:
                    self.send_header("Location", a.location)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if a.delay:
                    time.sleep(a.delay)
                if a.cut_after is not None:
                    self.wfile.write(body[: a.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # an abrupt end mid-body
                    return
                self.wfile.write(body[: len(body) - a.short_by])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, path: str, *answers: Answer) -> str:
        self.routes[path] = list(answers)
        return self.url + path

    def requests_for(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path.split("?")[0] == path]


@contextmanager
def fault_server() -> Iterator[FaultServer]:
    server = FaultServer()
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)
