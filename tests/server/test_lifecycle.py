"""Start-up failures, readiness before warm-up, and SIGTERM draining in-flight requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import REPO, ServerProcess
from tests.support import in_process_app, wait_ready


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def broken(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    cases = {}
    for name in ("no_weights", "truncated", "bad_config"):
        shutil.copytree(tiny_checkpoint, root / name)
        cases[name] = root / name
    (root / "no_weights" / "model.safetensors").unlink()
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = json.loads((root / "bad_config" / "config.json").read_text())
    config["d_model"] = -3
    (root / "bad_config" / "config.json").write_text(json.dumps(config))
    cases["missing_dir"] = root / "does-not-exist"
    return cases


@pytest.mark.parametrize(("case", "needle"), [("missing_dir", "does not exist"), ("no_weights", "model.safetensors"),
                                              ("truncated", "model.safetensors"), ("bad_config", "config.json")])
def test_bad_checkpoint_exits_with_clear_message(broken: dict[str, Path], case: str, needle: str) -> None:
    result = run_server("--checkpoint", str(broken[case]))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load checkpoint") and needle in last, last
    assert "Traceback" not in result.stderr


def test_bad_settings_exit_2(tiny_checkpoint: Path) -> None:
    result = run_server("--checkpoint", str(tiny_checkpoint), env={"CHIAR_MAX_BATCH_SIZE": "zero"})
    assert result.returncode == 2 and "CHIAR_MAX_BATCH_SIZE" in result.stderr
    result = run_server("--checkpoint", str(tiny_checkpoint), "--queue-size", "-1")
    assert result.returncode == 2 and "--queue-size" in result.stderr
    result = run_server()
    assert result.returncode == 2 and "--checkpoint" in result.stderr
    # the native kernels compute in float32 on the CPU: asked for with another dtype, a clear refusal
    result = run_server("--checkpoint", str(tiny_checkpoint), "--kernels", "native", "--dtype", "bfloat16")
    assert result.returncode == 2 and "--kernels" in result.stderr and "float32" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_ready_is_503_until_warmed_up(tiny_checkpoint: Path) -> None:
    """The app before its engine has started (no lifespan yet): /health 200, /ready and the API 503."""
    app, _ = in_process_app(tiny_checkpoint)
    client = TestClient(app)  # no `with`: lifespan not run
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
    r = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2})
    assert r.status_code == 503 and "retry-after" in r.headers
    with TestClient(app) as live:  # lifespan starts and warms the engine
        wait_ready(live, 30)
        assert live.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200


def test_sigterm_drains_in_flight_requests(long_checkpoint: Path, tmp_path: Path) -> None:
    proc = ServerProcess(long_checkpoint, tmp_path / "drain.log").start()
    events: list[dict] = []
    first = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            body = {"prompt": "Drain me", "max_new_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", proc.url + "/v1/generate", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        first.set()
        except BaseException as exc:  # surfaced below
            failure.append(exc)
            first.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(30)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer admitting: the listening socket is closed
        httpx.post(proc.url + "/v1/generate", json={"prompt": "late", "max_new_tokens": 2}, timeout=5)
    worker.join(60)
    assert not failure, failure
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"
    assert len(events[-1]["token_ids"]) == 300  # the in-flight request finished completely
    assert proc.proc.wait(30) == 0
    assert proc.stop() == 0
