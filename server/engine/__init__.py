"""The serving engine: scheduler (queues, budget, fairness), runner (model calls, KV cache), output
processing (sampling, stopping, detokenisation), and the engine thread that loops over them.

Names are imported lazily so `server.engine.scheduler` can be imported without torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Engine": "server.engine.engine",
    "EngineStatus": "server.engine.engine",
    "DoneEvent": "server.engine.requests",
    "ErrorEvent": "server.engine.requests",
    "Event": "server.engine.requests",
    "GenerateJob": "server.engine.requests",
    "GenerationResult": "server.engine.requests",
    "GenParams": "server.engine.requests",
    "Job": "server.engine.requests",
    "LogprobEntry": "server.engine.requests",
    "PromptEvent": "server.engine.requests",
    "ScoreJob": "server.engine.requests",
    "ScoreResult": "server.engine.requests",
    "TokenEvent": "server.engine.requests",
    "Unavailable": "server.engine.requests",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
