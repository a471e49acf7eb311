"""The RELIABILITY.md writer: a partial run (`--only`) replaces its probes and keeps the others."""

from __future__ import annotations

from pathlib import Path

from reliability.report import ProbeResult, parse_entries, write


def _result(name: str, held: str, passed: bool = True) -> ProbeResult:
    return ProbeResult(name=name, tried=f"{name} things", cases=3, held=held, lost="0", passed=passed,
                       figures={"p99 (ms)": 12.5})


def test_partial_run_replaces_only_its_probes(tmp_path: Path) -> None:
    report = tmp_path / "RELIABILITY.md"
    write(report, [_result("alpha", "old alpha"), _result("beta", "old | beta", passed=False)], "python -m reliability", False)
    write(report, [_result("beta", "new beta")], "python -m reliability", False, partial=True)
    text = report.read_text()
    entries = {e.name: e for e in parse_entries(text)}
    assert list(entries) == ["alpha", "beta"]
    assert "old alpha" in entries["alpha"].row and "old alpha" in "\n".join(entries["alpha"].section)
    assert "new beta" in entries["beta"].row and "| pass |" in entries["beta"].row
    assert "old" not in "\n".join(entries["beta"].section)
    assert text.count("## Documented limits") == 1


def test_full_run_drops_earlier_probes(tmp_path: Path) -> None:
    report = tmp_path / "RELIABILITY.md"
    write(report, [_result("alpha", "old alpha")], "python -m reliability", False)
    write(report, [_result("beta", "new beta")], "python -m reliability", False)
    assert [e.name for e in parse_entries(report.read_text())] == ["beta"]


def test_parse_keeps_the_committed_report_whole() -> None:
    text = (Path(__file__).resolve().parents[2] / "RELIABILITY.md").read_text()
    names = [e.name for e in parse_entries(text)]
    assert "big-bodies" in names and "soak" in names and len(names) == len(set(names))
