"""`python -m reliability [--short] [--only NAME ...]`: run the probes, write RELIABILITY.md (+ JSON).

Exit status 0 when every probe passed, 1 otherwise (the report says which and why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reliability.report import ProbeResult, write

PROBES = ("malformed-input", "disconnects", "determinism", "log-hygiene", "overload", "signals", "batch-invariance", "big-bodies",
          "soak", "tampered-checkpoints", "training-kills", "dependency-audit")
SERVER_PROBES = PROBES[:4]


def _timed(fn: Callable[[], ProbeResult]) -> ProbeResult:
    start = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # a probe that breaks is a finding, reported like any other
        result = ProbeResult(getattr(fn, "probe", "probe"), "the probe itself", 0, "nothing", f"probe raised {type(exc).__name__}: {exc}",
                             passed=False)
    result.seconds = time.monotonic() - start
    return result


def run(checkpoint: Path, work: Path, short: bool, only: set[str]) -> list[ProbeResult]:
    from model import ChiarConfig
    from reliability import server_probes as sp

    context = ChiarConfig.from_json((checkpoint / "config.json").read_text()).max_seq_len
    env = sp.Env(checkpoint, work, short, context)
    results: list[ProbeResult] = []
    wanted = [p for p in PROBES if not only or p in only]
    if any(p in wanted for p in SERVER_PROBES):
        server = sp.start(env, "server-main")
        logs = [server.log_path]
        try:
            if "malformed-input" in wanted:
                results.append(_timed(lambda: sp.probe_malformed(env, server)))
            if "disconnects" in wanted:
                results.append(_timed(lambda: sp.probe_disconnects(env, server)))
            if "determinism" in wanted:
                holder: list = []
                result = _timed(lambda: holder.append(sp.probe_determinism(env, server)) or holder[0][0])
                results.append(result)
                if holder:
                    server = holder[0][1]
                    logs.append(server.log_path)
        finally:
            server.stop()
        if "log-hygiene" in wanted:
            results.append(_timed(lambda: sp.probe_log_hygiene(env, logs)))
    if "overload" in wanted:
        results.append(_timed(lambda: sp.probe_overload(env)))
    if "signals" in wanted:
        results.append(_timed(lambda: sp.probe_signals(env)))
    if "batch-invariance" in wanted:
        from reliability.invariance_probe import probe_batch_invariance

        results.append(_timed(lambda: probe_batch_invariance(env)))
    if "big-bodies" in wanted:
        from reliability.body_probes import probe_big_bodies

        results.append(_timed(lambda: probe_big_bodies(env)))
    if "soak" in wanted:
        from reliability.soak import probe_soak

        results.append(_timed(lambda: probe_soak(env)))
    if "tampered-checkpoints" in wanted:
        from reliability.checkpoint_probes import probe_tampered

        results.append(_timed(lambda: probe_tampered(checkpoint, work)))
    if "training-kills" in wanted:
        from reliability.training_probes import probe_training_kills

        results.append(_timed(lambda: probe_training_kills(work / "training", short)))
    if "dependency-audit" in wanted:
        from reliability.audit import probe_audit

        results.append(_timed(lambda: probe_audit(work)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI variant: fewer cases, 10 s of overload")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/chiar-small"))
    parser.add_argument("--write", type=Path, default=Path("RELIABILITY.md"), help="markdown report to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--only", action="append", default=[], choices=PROBES, help="run only this probe (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    command = "python -m reliability" + (" --short" if args.short else "")
    if args.checkpoint != Path("checkpoints/chiar-small"):
        command += f" --checkpoint {shlex.quote(str(args.checkpoint))}"
    with tempfile.TemporaryDirectory(prefix="chiar-reliability-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args.checkpoint, work, args.short, set(args.only))
    write(args.write, results, command, args.short, partial=bool(args.only))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))
    for r in results:
        print(f"{r.name:22s} {'pass' if r.passed else 'FAIL'}  cases {r.cases}  lost: {r.lost}")
    print(f"wrote {args.write}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
