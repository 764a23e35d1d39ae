"""A real S3 server for the tests: moto's standalone `moto_server` on 127.0.0.1 (PyPI `moto[server]`, in the test
extra), spoken to by the real s3fs/botocore client over HTTP, and a TCP relay in front of it that a test can cut
and restore ("the server stops answering") without losing the server's in-memory buckets."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import urllib.request

from helpers import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def moto_server_command() -> str | None:
    return shutil.which("moto_server")


class MotoServer:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([moto_server_command(), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from exc
                time.sleep(0.1)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a client process needs: the standard AWS variables (botocore reads AWS_ENDPOINT_URL itself)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def filesystem(self, endpoint: str | None = None):
        import s3fs
        return s3fs.S3FileSystem(endpoint_url=endpoint or self.endpoint, key="testing", secret="testing",
                                 use_listings_cache=False, skip_instance_cache=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Relay:
    """127.0.0.1:port -> the server. `cut()` closes the listener and every open connection (clients get
    'connection refused' / reset, as from a stopped server); `restore()` listens on the same port again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; close() alone leaves it listening
            except OSError:
                pass
            listener.close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            threading.Thread(target=self._forward_requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to server; a relay that rewrites requests overrides this."""
        self._pump(client, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def require_moto(pytest) -> None:
    """The S3 tests need a real server: without moto_server and s3fs they fail, naming the install (the README's
    test command installs them), rather than skip and prove nothing."""
    try:
        import s3fs  # noqa: F401
        found = moto_server_command() is not None
    except ImportError:
        found = False
    if not found:
        pytest.fail("moto_server and s3fs are needed by the S3 tests; pip install -r requirements-cpu.txt "
                    "(or pip install -e '.[test,s3]')")
