"""The loopback HTTP server process that ``servers.HttpServer`` starts (stdlib only, no kit).

Python's ``http.server`` serving a directory, extended with single byte-range requests
(``Range: bytes=a-b``, ``a-``, ``-n``), no directory listings, and a request log (one line per
request: method, path, Range header); HTTPS when given a certificate and key.

    python http_server.py DIRECTORY --port N --ready-file F --request-log L [--tls-cert C --tls-key K]
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import re
import signal
import ssl


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # keep-alive + small writes would wait on delayed ACKs
    request_log = None  # set by main()

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def list_directory(self, path):
        self.send_error(404, "no listings")
        return None

    def send_head(self):
        if self.request_log is not None:
            self.request_log.write(f"{self.command}\t{self.path}\t{self.headers.get('Range', '')}\n")
            self.request_log.flush()
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or os.path.isdir(path):
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if m is None or (not m.group(1) and not m.group(2)):
                start, end = 0, size - 1  # unsupported form: whole file, as a 200
                status = 200
            elif not m.group(1):
                start, end, status = max(0, size - int(m.group(2))), size - 1, 206
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                status = 206
            if status == 206 and (start >= size or start > end):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--request-log")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()
    if args.request_log:
        _RangeHandler.request_log = open(args.request_log, "a")

    def handler(*a, **kw):
        return _RangeHandler(*a, directory=args.directory, **kw)

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    http.server.ThreadingHTTPServer.daemon_threads = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(tmp, args.ready_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
