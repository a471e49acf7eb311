"""`python -m server --checkpoint DIR [--checkpoint DIR2 ...] [--host H --port P ...]`: load, warm up, serve;
SIGTERM drains every engine."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from model.device import DeviceError, resolve_device
from server.settings import Settings, SettingsError

log = logging.getLogger("server")


def draining_server(config: Any, engines: Sequence[Any]) -> Any:
    """A uvicorn.Server that, on SIGTERM/SIGINT, stops admitting at once (503 on open connections) and
    marks /ready not ready; uvicorn then closes the listening socket and waits for in-flight requests.
    At the drain timeout each engine answers what is left with 503 / an SSE error event, and the
    process exits with status 3 (0 when nothing was cut)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            for engine in engines:
                engine.begin_drain()
            super().handle_exit(sig, frame)
            # a drained shutdown is a clean exit (status 0), not death by the signal uvicorn would re-raise
            self._captured_signals.clear()

    return DrainingServer(config)


class StartError(Exception):
    """A start-up failure after the settings were read: its message (for stderr) and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_sources(argv)
        device = resolve_device(settings.device, where="--device / CHIAR_DEVICE")
    except (SettingsError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.malloc_trim:
        from server.memory import limit_arenas

        limit_arenas()  # before torch and the server start their threads
    import torch  # heavy imports only once the settings are known to be valid

    from server.metrics import Metrics

    torch.set_num_threads(settings.forward_threads)
    # The engine thread and the event loop share the GIL; with the default 5 ms switch interval a
    # thread that wants it can wait 5 ms for the other's pure-Python stretch (JSON, output processing),
    # which shows up as inter-token latency. 1 ms bounds that wait; the forward releases the GIL anyway.
    sys.setswitchinterval(0.001)
    if settings.malloc_trim:
        from server.memory import Trimmer

        Trimmer().start()  # after loading: the weights' allocation is the baseline
    metrics = Metrics(device.type)
    try:
        services = load_services(settings, device, metrics)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    return serve(settings, services, metrics)


def load_services(settings: Settings, device: Any, metrics: Any) -> list[Any]:
    """One Service (model, engine, tokenizer) per --checkpoint; StartError with status 1 for a checkpoint that
    cannot be loaded, 2 for --kernels native where they cannot run."""
    from model import CheckpointError, load_checkpoint
    from model.hf_tokenizer import stale_files
    from model.storage import TORCH_DTYPES
    from server.engine.engine import Engine
    from server.engine.turns import DeviceTurns
    from server.service import Service

    turns = DeviceTurns()  # the engines take turns on the one device
    kv_share = settings.kv_cache_mb / len(settings.checkpoint)  # --kv-cache-mb is split evenly between the models
    services = []
    for path, name in zip(settings.checkpoint, settings.model_ids):
        try:
            model, tokenizer = load_checkpoint(path, device=device,
                                               dtype=None if settings.dtype == "auto" else TORCH_DTYPES[settings.dtype])
        except CheckpointError as exc:
            raise StartError(f"cannot load checkpoint {path}: {exc}", 1) from None
        except (OSError, ValueError, RuntimeError) as exc:  # anything else a broken checkpoint can raise
            raise StartError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}", 1) from None
        model.eval()
        try:
            engine = Engine(model, tokenizer, settings, metrics, name=name, kv_cache_mb=kv_share, turns=turns)
        except ValueError as exc:  # --kernels native where they cannot run
            raise StartError(f"--kernels / CHIAR_KERNELS: {exc}", 2) from None
        engine.metrics.info(model.config.arch, model.num_parameters())
        services.append(Service(settings, engine, tokenizer, path))
        if stale := stale_files(path):
            log.warning("%s: %s out of date, so AutoTokenizer gives other ids than the server; upgrade with "
                        "`python -m model.hf_tokenizer %s`", path, ", ".join(stale), path)
        log.info("serving %s (%s, %d parameters) on %s as %r", path, model.config.arch, model.num_parameters(), device, name)
    return services


def serve(settings: Settings, services: list[Any], metrics: Any) -> int:
    """Serve until a signal drains the engines; the exit status: 0, 1 (an engine failed or never started),
    3 (the drain timed out and cut requests)."""
    import uvicorn

    from server.app import create_app
    from server.memory import freeze_startup_objects

    engines = [svc.engine for svc in services]
    app = create_app(settings, services, metrics)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            # the engine cuts in-flight work at the drain timeout with a 503 / SSE error; uvicorn
                            # waits a little longer so those answers reach the clients
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 5, lifespan="on", access_log=False)
    server = draining_server(config, engines)
    log.info("froze %d start-up objects out of the garbage collector's reach", freeze_startup_objects())
    server.run()
    for engine in engines:
        if engine.fatal is not None:
            print(f"error: engine {engine.name!r} failed: {engine.fatal}", file=sys.stderr)
            return 1
    cut = sum(engine.cut_requests for engine in engines)
    if cut:
        print(f"error: the drain timed out and cut {cut} requests (503 / SSE error sent)", file=sys.stderr)
        return 3
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
