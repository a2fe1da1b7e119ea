"""A real HTTP media server on 127.0.0.1 for the image-URL tests (redirects, stalls, bombs).

    /img.png          a small valid PNG
    /to-local/<p>     302 to http://localhost:<port>/<p>   (a host that is not on the allowlist)
    /to-same/<p>      302 to http://127.0.0.1:<port>/<p>   (an allowed host)
    /drip             200, a PNG signature, then a byte every 0.5 s for `drip_s` seconds
    /file/<name>      the bytes registered with `server.files[name]`

`hits` records every path asked for, so a test can tell a redirect was not followed.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MediaServer:
    def __init__(self, png: bytes, drip_s: float = 30.0) -> None:
        self.png = png
        self.drip_s = drip_s
        self.files: dict[str, bytes] = {}
        self.hits: list[str] = []
        self._stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                owner.hits.append(self.path)
                if self.path == "/img.png":
                    return self._send(owner.png)
                if self.path.startswith("/file/") and self.path[6:] in owner.files:
                    return self._send(owner.files[self.path[6:]])
                for prefix, host in (("/to-local/", "localhost"), ("/to-same/", "127.0.0.1")):
                    if self.path.startswith(prefix):
                        self.send_response(302)
                        self.send_header("Location", f"http://{host}:{owner.port}/{self.path[len(prefix):]}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                if self.path == "/drip":
                    return self._drip()
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None

            def _send(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drip(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    self.wfile.write(b"\x89PNG\r\n\x1a\n")
                    self.wfile.flush()
                    deadline = time.monotonic() + owner.drip_s
                    while time.monotonic() < deadline and not owner._stop.is_set():
                        time.sleep(0.5)
                        self.wfile.write(b"\x00")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the test wants

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> "MediaServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
