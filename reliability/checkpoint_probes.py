"""Tampered checkpoints (reliability/checkpoint_cases.py): each must load as designed or fail with one clean
line, never crash, hang or allocate wildly; the peak memory each case adds is measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from loadtests.server_process import ROOT
from reliability.checkpoint_cases import CONFIG, MAX_SEQ_LEN, cases, expected_to_load
from reliability.report import ProbeResult

ALLOCATION_TARGET_MB = 300.0
ISSUE_CASES = (f"max_seq_len at its documented maximum ({MAX_SEQ_LEN})", "weights all NaN in one tensor (every byte 0xFF)",
               "pickle payload as tokenizer_config.json")

# One process loads every case (capped at 6 GiB of address space, 30 s per case). Before each case the
# peak RSS is reset (/proc/self/clear_refs); after it, VmHWM - the RSS before is what the case added.
_LOADER = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
from model import CheckpointError, load_checkpoint
def alarm(*_): raise TimeoutError("hung for 30 s")
def kb(field): return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[1:]:
    open("/proc/self/clear_refs", "w").write("5")
    before = kb("VmRSS:")
    signal.alarm(30)
    try:
        load_checkpoint(path)
        out = {"outcome": "loaded", "message": ""}
    except CheckpointError as exc:
        out = {"outcome": "error", "message": str(exc)}
    except BaseException as exc:
        out = {"outcome": "crash", "message": f"{type(exc).__name__}: {exc}"[:300]}
    signal.alarm(0)
    out["added_mb"] = round((kb("VmHWM:") - before) / 1024, 1)
    print(json.dumps({"path": path, **out}), flush=True)
"""


def _run_loader(paths: dict[str, str]) -> tuple[dict[str, dict], subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOADER, *paths], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["path"]: row for row in rows}, proc


def _cli_refuses(path: str) -> tuple[bool, str]:
    """`python -m server` on a tampered checkpoint exits non-zero with exactly one error line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "server", "--checkpoint", path, "--port", "0"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    lines = [line for line in cli.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    return cli.returncode != 0 and len(lines) == 1 and "Traceback" not in cli.stderr, f"exit {cli.returncode}: {cli.stderr[-300:]}"


def probe_tampered(checkpoint: Path, work: Path) -> ProbeResult:
    root = work / "tampered"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    names: dict[str, str] = {}
    for i, (name, edit) in enumerate(cases().items()):
        d = root / f"case-{i:02d}"
        shutil.copytree(checkpoint, d)
        edit(d)
        names[str(d)] = name
    outcomes, proc = _run_loader(names)
    operators = json.loads((checkpoint / CONFIG).read_text()).get("operators", [])
    failures, loaded, clean = [], [], 0
    for path, name in names.items():
        row = outcomes.get(path)
        if row is None:
            failures.append(f"{name}: loader process died ({proc.returncode}): {proc.stderr[-200:]}")
        elif row["outcome"] == "crash" or (row["outcome"] == "error" and "\n" in row["message"]):
            failures.append(f"{name}: {row['message']}")
        elif row["outcome"] == "loaded":
            loaded.append(name)
            if not expected_to_load(name, operators):
                failures.append(f"{name}: loaded without an error")
        else:
            clean += 1
        if row is not None and row["added_mb"] > ALLOCATION_TARGET_MB:
            failures.append(f"{name}: added {row['added_mb']} MB of RSS (target <= {ALLOCATION_TARGET_MB:g})")
    first_refused = next(p for p, n in names.items() if n.startswith("truncated"))
    cli_ok, cli_text = _cli_refuses(first_refused)
    if not cli_ok:
        failures.append(f"python -m server on {names[first_refused]}: {cli_text}")
    pickle_ran = Path("/tmp/chiar-pickle-was-executed").exists()
    if pickle_ran:
        failures.append("a pickle payload was executed")
    return _result(names, outcomes, clean, loaded, failures, cli_ok, pickle_ran)


def _result(names: dict[str, str], outcomes: dict[str, dict], clean: int, loaded: list[str], failures: list[str], cli_ok: bool,
            pickle_ran: bool) -> ProbeResult:
    by_name = {n: outcomes.get(p, {}) for p, n in names.items()}
    added = [row.get("added_mb", 0.0) for row in by_name.values()]
    worst = max(by_name, key=lambda n: by_name[n].get("added_mb", 0.0))
    handled = clean + len(loaded) - sum(1 for f in failures if f.endswith("loaded without an error"))
    figures: dict = {"refused with one line": clean, "loaded as designed": ", ".join(loaded) or "none",
                     "largest allocation before the outcome (MB)": f"{max(added):.1f} ({worst})"}
    paths = {n: p for p, n in names.items()}
    for name in ISSUE_CASES:
        row = by_name.get(name, {})
        outcome = (row.get("message") or row.get("outcome", "not run")).replace(paths.get(name, "?"), "<ckpt>")
        figures[f"issue case: {name}"] = f"{outcome} (added {row.get('added_mb', float('nan'))} MB)"
    for path, name in list(names.items())[:76:9]:
        if outcomes.get(path, {}).get("message"):
            figures[f"e.g. {name}"] = outcomes[path]["message"].replace(path, "<ckpt>")
    return ProbeResult(
        "tampered-checkpoints", f"{len(names)} copies of the checkpoint: truncated, bit-flipped, reshaped, NaN/inf weights, "
        "absurd or wrong-typed config fields, max_seq_len at its documented maximum, pickle payloads, FIFOs, "
        "dangling/looping symlinks, /dev/zero, directories and garbage in place of each of the five files; all loaded in one "
        "process capped at 6 GiB of address space with a 30 s alarm per case and its peak RSS reset per case, plus "
        "`python -m server` on one of them", len(names),
        f"{handled} of {len(names)} handled cleanly ({clean} refused with one line, {len(loaded)} loaded as designed); "
        f"pickle never executed: {not pickle_ran}; server CLI exits with one error line: {cli_ok}",
        f"{len(failures)} crashes, hangs, multi-line errors, unexpected loads or allocations over {ALLOCATION_TARGET_MB:g} MB",
        passed=not failures, figures=figures, failures=failures)
