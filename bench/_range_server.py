"""A static HTTP server that answers ``Range: bytes=a-b`` with 206, as nginx, S3 or GCS do (``http.server`` answers
200 with the whole file), run in its own process so that its work does not count as the reader's."""

from __future__ import annotations

import http.server
import multiprocessing
from contextlib import contextmanager
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the shard reader uses it
    disable_nagle_algorithm = True  # TCP_NODELAY, as nginx sets it: no delayed-ACK stall between header and body

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        with open(path, "rb") as fh:
            if wanted:
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


def _serve(directory: str, port_queue) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **k: RangeHandler(*a, directory=directory, **k))
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


@contextmanager
def served(directory: Path):
    """``http://127.0.0.1:PORT/`` serving ``directory`` from another process while the block runs."""
    context = multiprocessing.get_context("fork")  # stdlib only in the child: no re-import of the caller
    ports = context.Queue()
    process = context.Process(target=_serve, args=(str(directory), ports), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=60)}/"
    finally:
        process.terminate()
        process.join()
