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


@dataclass
class _Entry:
    """One probe as it appears in the report: its summary row and its section."""

    name: str
    row: str
    section: list[str]


def _entry(r: ProbeResult, command: str, when: str) -> _Entry:
    verdict = "pass" if r.passed else ("FAIL (known, open)" if r.known_open else "FAIL")
    section = ["", f"## {r.name}", "", f"Tried: {r.tried}", "", f"- cases: {r.cases}", f"- held: {r.held}",
               f"- lost: {r.lost}", f"- result: {'pass' if r.passed else 'FAIL'}", f"- probe time: {r.seconds:.1f} s",
               f"- measured: {when}"]
    section += [f"- {key}: {value}" for key, value in r.figures.items()]
    if r.failures:
        section += ["", "Failures (first 12):", ""] + [f"- `{_cell(f)}`" for f in r.failures[:12]]
    section += ["", f"Command: `{command} --only {r.name}`"]
    return _Entry(r.name, f"| {r.name} | {r.cases} | {_cell(r.held)} | {_cell(r.lost)} | {verdict} |", section)


def parse_entries(text: str) -> list[_Entry]:
    """The probes of an existing report, in order (rows from the summary table, sections by heading)."""
    lines = text.splitlines()
    start = next((i + 2 for i, line in enumerate(lines) if line.startswith("| probe ")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    rows = {line.split("|")[1].strip(): line for line in lines[start:end]}
    entries: list[_Entry] = []
    for i, line in enumerate(lines):
        name = line[3:].strip() if line.startswith("## ") else ""
        if name not in rows:
            continue
        stop = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        entries.append(_Entry(name, rows[name], ["", *lines[i:stop]]))
        while entries[-1].section[-1] == "":
            entries[-1].section.pop()
    return entries


def render(results: list[ProbeResult], command: str, short: bool, keep: list[_Entry] | None = None) -> str:
    """RELIABILITY.md: a summary table, then one section per probe with its figures.

    `keep`: probes of an earlier report that this run did not repeat (`--only`); they stay, in their
    order, with their own measurement dates.
    """
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fresh = {r.name: _entry(r, command, when) for r in results}
    entries = [fresh.pop(e.name, e) for e in keep or []] + list(fresh.values())
    note = "" if not keep else " (the probes it ran; the others keep the date of their own run)"
    lines = [
        "# Reliability",
        "",
        f"Produced by `{command}` on {when}{note} ({platform.machine()}, Python {platform.python_version()},"
        f" {'short' if short else 'full'} variant). Every figure below comes from a run of that command; rerun it",
        "to refresh this file. `make reliability` runs the full variant; CI runs `--short`.",
        "",
        "| probe | cases | held | lost | result |",
        "|---|---|---|---|---|",
    ]
    lines += [e.row for e in entries]
    for e in entries:
        lines += e.section
    lines += limits_section()
    return "\n".join(lines) + "\n"


def write(path: Path, results: list[ProbeResult], command: str, short: bool, partial: bool = False) -> None:
    """Write the report; a `partial` run (`--only`) replaces its probes in an existing report and keeps the rest."""
    keep = parse_entries(path.read_text(encoding="utf-8")) if partial and path.exists() else None
    path.write_text(render(results, command, short, keep), encoding="utf-8")
