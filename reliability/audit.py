"""Dependency audit: pip-audit over the locked runtime requirements (PyPI's vulnerability data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from reliability.report import ProbeResult

ROOT = Path(__file__).resolve().parent.parent


def probe_audit(work: Path) -> ProbeResult:
    tool = shutil.which("pip-audit") or str(Path(sys.executable).parent / "pip-audit")
    out = work / "pip-audit.json"
    locks = ["requirements.txt", "requirements-dev.txt"]
    cmd = [tool, *[a for lock in locks for a in ("-r", lock)], "--no-deps", "--disable-pip", "--progress-spinner", "off",
           "-f", "json", "-o", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ProbeResult("dependency-audit", "pip-audit over " + " and ".join(locks), 0, "not run", f"pip-audit could not run: {exc}",
                           passed=False)
    try:
        deps = json.loads(out.read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult("dependency-audit", "pip-audit over " + " and ".join(locks), 0, "not run",
                           f"pip-audit could not reach its vulnerability service or failed: {reason}", passed=False)
    vulnerable = [f"{d['name']}=={d.get('version')}: {', '.join(v['id'] for v in d['vulns'])}" for d in deps if d.get("vulns")]
    skipped = [d["name"] for d in deps if d.get("skip_reason")]
    return ProbeResult(
        "dependency-audit", "pip-audit (PyPI vulnerability service) over the pinned " + " and ".join(locks), len(deps),
        f"{len(deps) - len(vulnerable) - len(skipped)} pinned packages with no known vulnerability",
        f"{len(vulnerable)} with known vulnerabilities; {len(skipped)} not auditable ({', '.join(skipped[:5])})",
        passed=not vulnerable, figures={"pip-audit": "2.10.1 (pinned in requirements-dev.txt)"}, failures=vulnerable)
