"""Loopback servers for remote stores (the tests, make bench, scripts/scale_out.py), each in
its own process.

* ``HttpServer``: Python's ``http.server`` serving a directory, extended with single byte-range
  requests (``Range: bytes=a-b``, ``a-``, ``-n``), no directory listings, and a request log
  (one line per request: method, path, Range header) that tests read to see what was fetched.
  The server process itself is ``http_server.py``.
* ``MotoServer``: moto's S3-compatible server (``python -m moto.server``).

Both bind 127.0.0.1 only, are started and stopped by their callers, wait for readiness
by polling with a deadline, and can be restarted on the same port (a "server comes back").
The servers run in subprocesses, never threads: a test that page-faults on a mounted file holds
the GIL while the FUSE daemon waits for the server.

``HttpServer`` serves HTTPS when given a certificate: ``make_tls_files`` makes a throwaway CA and
a certificate for localhost signed by it (with the ``openssl`` command).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .procs import wait_until

START_TIMEOUT = 20.0  # seconds for a server to accept connections
STOP_TIMEOUT = 10.0
HTTP_SERVER = Path(__file__).resolve().with_name("http_server.py")  # the server process


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class _Process:
    """A server subprocess with its log file; stop() terminates it and waits (bounded)."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def _spawn(self, cmd: list[str], env=None) -> None:
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def _wait_ready(self, find_port) -> None:
        port = wait_until(lambda: find_port() or (self.proc.poll() is not None and -1), START_TIMEOUT)
        if not port or port == -1:
            log = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"server did not start within {START_TIMEOUT}s: {log}")
        self.port = port
        if not wait_until(lambda: _accepts(port), START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"server on port {port} does not accept connections")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, never answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server and wait until its port refuses connections."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a frozen server could not act on SIGTERM
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
        finally:
            self._log.close()
        if self.port is not None:
            wait_until(lambda: not _accepts(self.port), STOP_TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def make_tls_files(workdir) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) PEM files in ``workdir``: a CA made for
    this test, and a certificate for localhost / 127.0.0.1 that it signed."""
    d = Path(workdir)
    ca, ca_key, cert, key, csr, ext = (d / n for n in ("ca.pem", "ca.key", "server.pem", "server.key",
                                                      "server.csr", "server.ext"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=zarrfs test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


class HttpServer(_Process):
    """``python -m http.server``-like static server of ``directory`` with range requests."""

    def __init__(self, directory, workdir, tls: tuple[Path, Path] | None = None):
        """``tls``: (certificate chain, key) PEM files to serve HTTPS with."""
        workdir = Path(workdir)
        super().__init__(workdir / "http-server.log")
        self.directory = Path(directory)
        self.ready_file = workdir / "http-server.port"
        self.request_log = workdir / "http-requests.log"
        self.tls = tls

    def start(self, port: int = 0) -> "HttpServer":
        """Start on ``port`` (0: an ephemeral port; a restart passes the old one)."""
        self.ready_file.unlink(missing_ok=True)
        tls = ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else []
        self._spawn([sys.executable, str(HTTP_SERVER), str(self.directory), "--port", str(port),
                     "--ready-file", str(self.ready_file), "--request-log", str(self.request_log), *tls])

        def find_port():
            try:
                text = self.ready_file.read_text()
            except FileNotFoundError:
                return None
            return int(text) if text.endswith("\n") else None

        self._wait_ready(find_port)
        return self

    def restart(self) -> "HttpServer":
        port = self.port
        self.stop()
        return self.start(port)

    def url(self, rel: str) -> str:
        if self.tls:  # the certificate names localhost
            return f"https://localhost:{self.port}/{rel}"
        return f"http://127.0.0.1:{self.port}/{rel}"

    def requests(self) -> list[tuple[str, str, str]]:
        """(method, path, range header or "") of every request so far."""
        try:
            lines = self.request_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [tuple((line.split("\t") + ["", "", ""])[:3]) for line in lines if line]

    def clear_requests(self) -> None:
        self.request_log.write_text("")


class MotoServer(_Process):
    """moto's S3 server on loopback; state lives in the process (lost on restart)."""

    ACCESS_KEY = "zarrfs-test"
    SECRET_KEY = "zarrfs-test-secret"
    REGION = "us-east-1"

    def __init__(self, workdir):
        super().__init__(Path(workdir) / "moto-server.log")

    def start(self) -> "MotoServer":
        self.log_path.write_text("")
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])

        def find_port():
            m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            return int(m.group(1)) if m else None

        self._wait_ready(find_port)
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self, anonymous: bool = False) -> dict:
        """AWS_* variables for zarrfs (and boto3) to reach this server, isolated from any
        ~/.aws configuration of the machine."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": self.REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        if anonymous:
            env["AWS_SKIP_SIGNATURE"] = "true"
        else:
            env["AWS_ACCESS_KEY_ID"] = self.ACCESS_KEY
            env["AWS_SECRET_ACCESS_KEY"] = self.SECRET_KEY
        return env

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.REGION,
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY)


def upload_dir(client, bucket: str, prefix: str, directory, public: bool = False) -> int:
    """Upload every file under ``directory`` to ``s3://bucket/prefix/...`` (``public``: readable
    without credentials); returns the count."""
    from concurrent.futures import ThreadPoolExecutor

    directory = Path(directory)
    paths = [Path(root, name) for root, _, files in os.walk(directory) for name in files]
    extra = {"ACL": "public-read"} if public else {}

    def put(path: Path) -> None:
        key = f"{prefix}/{path.relative_to(directory).as_posix()}".lstrip("/")
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **extra)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, paths))
    return len(paths)
