"""One probe's outcome and the RELIABILITY.md writer."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ProbeResult:
    """What a probe tried, how many cases, what held, what was lost, and whether it passed.

    `known_open` marks a failure that is a known, filed bug (reported, not asserted on in CI).
    """

    name: str
    tried: str
    cases: int
    held: str
    lost: str
    passed: bool
    figures: dict[str, float | int | str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    known_open: bool = False
    seconds: float = 0.0


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def limits_section() -> list[str]:
    """The documented limits, read from the code that enforces them (never typed by hand)."""
    import dataclasses

    from model.checkpoint_guard import LIMITS

    lines = ["", "## Documented limits", "", "Checkpoint loading refuses, before allocating, configs beyond these "
             "(`model/checkpoint_guard.py`, `Limits`), and any config implying more parameters than its weights file holds:", ""]
    lines += [f"- `{f.name}` <= {getattr(LIMITS, f.name)}" for f in dataclasses.fields(LIMITS)]
    from server.settings import Settings
    from server.token_limits import MAX_RUN_CHARS, PIECE_CHARS

    names = ("max_body_bytes", "max_inflight_body_bytes", "max_score_tokens", "max_prompts", "max_batch_size", "queue_size",
             "max_tokens_per_step", "request_timeout", "body_timeout", "drain_timeout", "malloc_trim")
    lines += ["", "Per-request and server limits (`server/settings.py` defaults; each is a `--flag` and a `CHIAR_*` "
              "variable; prompt plus generated tokens must also fit the model context):", ""]
    lines += [f"- `{name}` = {Settings.model_fields[name].default}: {Settings.model_fields[name].description}" for name in names]
    lines += [f"- texts are tokenized in pieces of about {PIECE_CHARS} characters cut between words; a text with more than "
              f"{MAX_RUN_CHARS} characters in a row that cannot be cut is refused (`server/token_limits.py`)"]
    return lines


def render(results: list[ProbeResult], command: str, short: bool) -> str:
    """RELIABILITY.md: a summary table, then one section per probe with its figures."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Reliability",
        "",
        f"Produced by `{command}` on {when} ({platform.machine()}, Python {platform.python_version()},"
        f" {'short' if short else 'full'} variant). Every figure below comes from that run; rerun the",
        "command to refresh this file. `make reliability` runs the full variant; CI runs `--short`.",
        "",
        "| probe | cases | held | lost | result |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        verdict = "pass" if r.passed else ("FAIL (known, open)" if r.known_open else "FAIL")
        lines.append(f"| {r.name} | {r.cases} | {_cell(r.held)} | {_cell(r.lost)} | {verdict} |")
    for r in results:
        lines += ["", f"## {r.name}", "", f"Tried: {r.tried}", "", f"- cases: {r.cases}", f"- held: {r.held}",
                  f"- lost: {r.lost}", f"- result: {'pass' if r.passed else 'FAIL'}", f"- probe time: {r.seconds:.1f} s"]
        for key, value in r.figures.items():
            lines.append(f"- {key}: {value}")
        if r.failures:
            lines += ["", "Failures (first 12):", ""] + [f"- `{_cell(f)}`" for f in r.failures[:12]]
        lines += ["", f"Command: `{command} --only {r.name}`"]
    lines += limits_section()
    return "\n".join(lines) + "\n"


def write(path: Path, results: list[ProbeResult], command: str, short: bool) -> None:
    path.write_text(render(results, command, short), encoding="utf-8")
