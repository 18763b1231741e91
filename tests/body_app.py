"""A small application behind target nginx (proxy_pass): answers a POST or
PUT with the length and SHA-256 of the body it received, so a client can
check that every byte of a request body reached the backend intact.

    python3 tests/body_app.py ADDRESS PORT
"""

from __future__ import annotations

import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BodyDigest(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        h = hashlib.sha256()
        left, n = int(self.headers.get("Content-Length", "0")), 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
            n += len(chunk)
        self.send_response(200)
        self.send_header("X-Body-Length", str(n))
        self.send_header("X-Body-SHA256", h.hexdigest())
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = _answer
    do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), BodyDigest)
    print("READY", flush=True)
    server.serve_forever()
