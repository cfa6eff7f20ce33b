"""A static HTTP server on 127.0.0.1 that answers ``Range: bytes=a-b`` with 206, as nginx, S3 or GCS do
(``http.server`` answers 200 with the whole file). Stdlib only: the loader benchmark runs it in a forked process
(``bench/_range_server.py``); the tests serve from a thread (:func:`served`)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; ``ignore_ranges`` makes it answer 200 with the whole file, as a server without range
    support does."""

    ignore_ranges = False
    protocol_version = "HTTP/1.1"  # keep-alive, as the shard reader uses it
    disable_nagle_algorithm = True  # TCP_NODELAY, as nginx sets it: no delayed-ACK stall between header and body

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        with open(path, "rb") as fh:
            if wanted and not self.ignore_ranges:
                first, last = (int(x) for x in wanted.split("=")[1].split("-"))
                fh.seek(first)
                data, status = fh.read(last + 1 - first), 206
            else:
                data, status = fh.read(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def range_server(directory: str | Path, ignore_ranges: bool = False) -> http.server.ThreadingHTTPServer:
    """A server bound to a free port of 127.0.0.1 (not yet serving)."""
    handler = type("Handler", (RangeHandler,), {"ignore_ranges": ignore_ranges})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(directory), **k))
    server.daemon_threads = True  # closing does not wait for the connections the reader keeps open
    return server


@contextmanager
def served(directory: str | Path, ignore_ranges: bool = False) -> Iterator[str]:
    """``http://127.0.0.1:PORT/`` serving ``directory`` from a thread while the block runs."""
    server = range_server(directory, ignore_ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
