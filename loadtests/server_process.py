"""Start and stop a real `python -m server` process on loopback (used by the runner and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET url; returns (status, body) also for HTTP error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ServerProcess:
    """A server subprocess bound to 127.0.0.1; a context manager that waits for /ready."""

    def __init__(self, checkpoint: str | Path, *, port: int | None = None, env: Mapping[str, str] | None = None,
                 log_path: str | Path | None = None, extra_args: list[str] | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.port = port or free_port()
        self.env = dict(env or {})
        # Output always goes to a file: an unread pipe would block a chatty server.
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="chiar-server-", suffix=".log")[1])
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8123."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self.proc is None:
            raise RuntimeError("server not started")
        return self.proc.pid

    def start(self, ready_timeout: float = 120.0) -> ServerProcess:
        """Launch the server and block until GET /ready answers 200."""
        if not (self.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint}: no config.json (train or pass another --checkpoint)")
        cmd = [sys.executable, "-m", "server", "--checkpoint", str(self.checkpoint),
               "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        env = {**os.environ, **self.env}
        env.setdefault("CHIAR_LOG_LEVEL", "warning")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before ready:\n{self.output_tail()}")
            try:
                status, _ = http_get(self.url + "/ready", timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready within {ready_timeout:.0f} s:\n{self.output_tail()}")

    def output_tail(self, chars: int = 4000) -> str:
        """Last characters the server printed."""
        if self._log:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
