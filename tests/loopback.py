"""A throwaway HTTP server on loopback that records what was fetched from it (CRL distribution
points, external DTDs): for tests that check what the gateway fetches, and what it refuses to."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def serving(body: Callable[[], bytes], content_type: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve `body()` (read at each request) for every GET; yields (base URL, fetched paths)."""
    fetched: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            fetched.append(self.path)
            data = body()
            self.send_response(200)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fetched
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
