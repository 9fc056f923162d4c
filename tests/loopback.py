"""A real HTTP server on 127.0.0.1 for tests: records every request, answers from a script.

    with LoopbackServer() as server:
        server.script(500, (429, {"Retry-After": "1"}), 200)
        ... POST to server.url (from this process or a subprocess) ...
        assert [r.path for r in server.requests] == [...]

Answers are consumed one per request, in order; once the script is empty every request
gets the default answer (200 with ``{"errcode":0,"errmsg":"ok"}`` unless `default()` set
another). An answer is one of:

    200, 410, 500, ...                 that status; a 2xx carries the default OK JSON body
    {"errcode": 45009, ...} or [...]   200 with this JSON body
    (status, headers)                  e.g. (429, {"Retry-After": "1"})
    (status, headers, body)            body: bytes, str, or anything JSON-serialisable
    "hang" or ("hang", seconds)        wait (default `hang_seconds`) and then answer 200;
                                       other requests are answered meanwhile and stop()
                                       cuts the wait short
    "close"                            close the connection without answering
    Answer(...)                        all of the above, spelled out

Each response carries ``Connection: close``, so no idle keep-alive connection outlives a
test. The server runs in a daemon thread; requests are handled in threads of their own.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

OK_BODY = b'{"errcode":0,"errmsg":"ok"}'


@dataclass(frozen=True)
class Answer:
    """One scripted answer."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: the default OK JSON for a 2xx, a short text otherwise
    hang: float = 0.0  # seconds to wait before answering
    close: bool = False  # drop the connection instead of answering


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    time: float  # time.time() when the body had been read

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def _body(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, ensure_ascii=False).encode()


def to_answer(value: Any, hang_seconds: float) -> Answer:
    """Normalise a script entry to an `Answer`."""
    if isinstance(value, Answer):
        return value
    if isinstance(value, bool):
        raise TypeError(f"not a scripted answer: {value!r}")
    if isinstance(value, int):
        return Answer(status=value)
    if isinstance(value, dict | list):
        return Answer(status=200, body=_body(value))
    if value == "hang":
        return Answer(hang=hang_seconds)
    if value == "close":
        return Answer(close=True)
    if isinstance(value, tuple):
        if len(value) == 2 and value[0] == "hang":
            return Answer(hang=float(value[1]))
        if len(value) == 2 and isinstance(value[0], int):
            return Answer(status=value[0], headers=dict(value[1]))
        if len(value) == 3 and isinstance(value[0], int):
            return Answer(status=value[0], headers=dict(value[1]), body=_body(value[2]))
    raise TypeError(f"not a scripted answer: {value!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out and hang up are expected here: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle or stalled client cannot hold a thread for longer

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    def _handle(self) -> None:
        owner = self.server.owner
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        owner._record(Recorded(self.command, self.path, headers, body, time.time()))
        answer = owner._next_answer()
        if answer.hang > 0 and owner._stopping.wait(answer.hang):
            self.close_connection = True
            return
        self.close_connection = True
        if answer.close:
            return
        payload = answer.body
        if payload is None:
            ok = 200 <= answer.status < 300
            payload = OK_BODY if ok else f"status {answer.status}\n".encode()
        try:
            self.send_response(answer.status)
            names = {k.lower() for k in answer.headers}
            if "content-type" not in names:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            pass  # the client gave up (e.g. it timed out during a hang)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (a free port), started on construction."""

    def __init__(self, *, hang_seconds: float = 5.0) -> None:
        self.hang_seconds = hang_seconds
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._script: deque[Answer] = deque()
        self._default = Answer()
        self._stopping = threading.Event()
        self._arrived = threading.Condition(self._lock)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        port = self._server.server_port
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"loopback-{port}",
            daemon=True,
        )
        self._thread.start()

    # Scripting -------------------------------------------------------------------

    def script(self, *answers: Any) -> None:
        """Append answers, consumed one per request in order."""
        normalised = [to_answer(a, self.hang_seconds) for a in answers]
        with self._lock:
            self._script.extend(normalised)

    def default(self, answer: Any) -> None:
        """The answer once the script is empty."""
        normalised = to_answer(answer, self.hang_seconds)
        with self._lock:
            self._default = normalised

    @property
    def pending(self) -> int:
        """Scripted answers not yet used."""
        with self._lock:
            return len(self._script)

    # What arrived ----------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """A copy of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        """Wait until at least `count` requests arrived (AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} requests within {timeout} s, got {len(self._requests)}"
                    )
                self._arrived.wait(left)
            return list(self._requests)

    def clear(self) -> None:
        """Forget the requests recorded so far."""
        with self._lock:
            self._requests.clear()

    def _record(self, request: Recorded) -> None:
        with self._arrived:
            self._requests.append(request)
            self._arrived.notify_all()

    def _next_answer(self) -> Answer:
        with self._lock:
            return self._script.popleft() if self._script else self._default

    # Lifetime --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop serving (hanging answers end at once); safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
