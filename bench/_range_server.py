"""A static HTTP server that answers ``Range: bytes=a-b`` with 206, as nginx, S3 or GCS do (``http.server`` answers
200 with the whole file), run in its own process so that its work does not count as the reader's."""

from __future__ import annotations

import multiprocessing
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.range_server import range_server  # noqa: E402  (stdlib only)


def _serve(directory: str, port_queue) -> None:
    server = range_server(directory)
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
