"""Dependency audit: pip-audit over the locked requirements (PyPI's vulnerability data, then OSV)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from loadtests.server_process import ROOT
from reliability.report import ProbeResult

LOCKS = ("requirements.txt", "requirements-dev.txt")
TRIED = "pip-audit 2.10.1 (pinned in requirements-dev.txt) over the pinned " + " and ".join(LOCKS) + ", --no-deps"


def _attempt(work: Path, service: str) -> tuple[list[dict] | None, str]:
    """(dependencies with their vulns/skip reasons, or None; why not)."""
    tool = shutil.which("pip-audit") or str(Path(sys.executable).parent / "pip-audit")
    out = work / f"pip-audit-{service}.json"
    cmd = [tool, *[a for lock in LOCKS for a in ("-r", lock)], "--no-deps", "--disable-pip", "--progress-spinner", "off",
           "-s", service, "-f", "json", "-o", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip-audit could not run: {exc}"
    try:
        deps = json.loads(out.read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        return None, (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if deps and all(d.get("skip_reason") for d in deps):
        return None, f"all {len(deps)} packages skipped, e.g. '{deps[0]['skip_reason']}'"
    return deps, ""


def probe_audit(work: Path) -> ProbeResult:
    reasons = {}
    for service in ("pypi", "osv"):
        deps, why = _attempt(work, service)
        if deps is not None:
            break
        reasons[service] = why
    if deps is None:
        return ProbeResult(
            "dependency-audit", TRIED, 0, "nothing: no package could be audited from this machine",
            "audit not possible here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
            + ". Run `make reliability` where pypi.org's JSON API or api.osv.dev is reachable", passed=False)
    vulnerable = [f"{d['name']}=={d.get('version')}: {', '.join(v['id'] for v in d['vulns'])}" for d in deps if d.get("vulns")]
    skipped = [d["name"] for d in deps if d.get("skip_reason")]
    return ProbeResult(
        "dependency-audit", TRIED + f" (service: {service})", len(deps),
        f"{len(deps) - len(vulnerable) - len(skipped)} pinned packages with no known vulnerability",
        f"{len(vulnerable)} with known vulnerabilities; {len(skipped)} not auditable ({', '.join(skipped[:5])})",
        passed=not vulnerable and not skipped, failures=vulnerable)
