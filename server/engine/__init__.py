"""The serving engine: scheduler (queues, budget, fairness), runner (model calls, KV cache), output
processing (sampling, stopping, detokenisation), and the engine thread that loops over them.

Import from the modules themselves (`server.engine.engine.Engine`, `server.engine.requests.GenerateJob`):
the package imports nothing, so `server.engine.scheduler` stays importable without torch.
"""
