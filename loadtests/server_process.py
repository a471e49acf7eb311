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


class LoopbackProcess:
    """A server command bound to 127.0.0.1; a context manager that waits until ``ready_path`` answers 200.

    Output always goes to a file: an unread pipe would block a chatty server.
    """

    def __init__(self, cmd: list[str], *, port: int, env: Mapping[str, str] | None = None,
                 log_path: str | Path | None = None, ready_path: str = "/health", cwd: Path = ROOT) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="chiar-server-", suffix=".log")[1])
        self.ready_path = ready_path
        self.cwd = cwd
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

    def command(self) -> list[str]:
        """The command line to launch (subclasses build it at start)."""
        return self.cmd

    def start(self, ready_timeout: float = 120.0) -> LoopbackProcess:
        """Launch the server and block until GET ready_path answers 200."""
        cmd = self.command()
        env = {**os.environ, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with code {self.proc.returncode} before ready:\n{self.output_tail()}")
            try:
                status, _ = http_get(self.url + self.ready_path, timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{cmd[0]} not ready within {ready_timeout:.0f} s:\n{self.output_tail()}")

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

    def __enter__(self) -> LoopbackProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess(LoopbackProcess):
    """`python -m server` on loopback, ready when GET /ready answers 200 (benchmarks, load tests, the tests).

    Without an explicit `port` it takes a free one, and another if that was taken before the server bound it.
    """

    def __init__(self, checkpoint: str | Path, log_path: str | Path | None = None, *, port: int | None = None,
                 env: Mapping[str, str] | None = None, args: list[str] | None = None) -> None:
        env = {**({} if "CHIAR_LOG_LEVEL" in os.environ else {"CHIAR_LOG_LEVEL": "warning"}), **(env or {})}
        super().__init__([], port=port or free_port(), env=env, log_path=log_path, ready_path="/ready")
        self.checkpoint = Path(checkpoint)
        self.args = list(args or [])
        self.fixed_port = port is not None

    def command(self) -> list[str]:
        if not (self.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint}: no config.json (train or pass another --checkpoint)")
        return [sys.executable, "-m", "server", "--checkpoint", str(self.checkpoint),
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def start(self, ready_timeout: float = 120.0) -> ServerProcess:
        """Launch the server and block until GET /ready answers 200."""
        for attempt in range(3):
            try:
                super().start(ready_timeout)
                return self
            except (RuntimeError, TimeoutError):
                if self.fixed_port or attempt == 2 or "address already in use" not in self.output_tail().lower():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def __enter__(self) -> ServerProcess:
        return self.start()
