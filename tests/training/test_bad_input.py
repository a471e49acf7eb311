"""Bad input: a clear one-line message, exit status 2, and no checkpoint left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.helpers import run_module, tiny_train_config, write_config
from training.__main__ import main


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _no_checkpoint(out_dir: Path) -> None:
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())
    assert not (out_dir / "best").exists()


@pytest.mark.parametrize(
    ("setup", "needles"),
    [
        ("missing", ["data[0] (wiki)", "file not found"]),
        ("empty", ["data[0] (wiki)", "is empty"]),
        ("whitespace", ["data[0] (wiki)", "is empty"]),
        ("latin1", ["data[0] (wiki)", "not valid UTF-8", "offset"]),
        ("tiny", ["data (wiki)", "fewer than one batch", "batch_size=4"]),
        ("emptydir", ["data[0] (wiki)", "holds no files"]),
    ],
)
def test_bad_training_data(
    tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str], setup: str, needles: list[str]
) -> None:
    data = tmp_path / "data.txt"
    if setup == "empty":
        data.write_text("")
    elif setup == "whitespace":
        data.write_text("  \n\n \t\n")
    elif setup == "latin1":
        data.write_bytes(b"good text\n" * 50 + "caf\xe9 cr\xe8me\n".encode("latin-1"))
    elif setup == "tiny":
        data.write_text("a few words only\n")
    elif setup == "emptydir":
        data.mkdir()
        (data / ".hidden").write_text("ignored")
    raw = tiny_train_config(tmp_path / "run", corpus_dir)
    raw["data"] = [{"name": "wiki", "path": str(data)}]
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], *needles)
    assert not (tmp_path / "run").exists()


def test_bad_eval_data_is_rejected_too(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_train_config(tmp_path / "run", corpus_dir)
    raw["eval_data"] = [{"name": "test", "path": str(tmp_path / "nope.txt")}]
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], "eval_data[0] (test)", "file not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["out_dir", "export_dir"])
def test_unwritable_output_directory(tmp_path: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str], key: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    raw = tiny_train_config(tmp_path / "run", corpus_dir, export_dir=str(tmp_path / "export"))
    raw[key] = str(blocker / "sub")
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], f"{key}: cannot write", "not a directory")
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()


def test_resume_from_another_architecture(
    tmp_path: Path, corpus_dir: Path, baseline_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = sorted((baseline_run["run"] / "checkpoints").iterdir())[-1]
    raw = tiny_train_config(tmp_path / "run", corpus_dir, resume=str(ckpt))
    raw["model"].update(arch="chiar", routing="soft")
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))],
           "resume:", "arch 'baseline'", "model.arch is 'chiar'")
    assert not (tmp_path / "run").exists()

    # resume=auto into the baseline's own run directory: refused, its checkpoints untouched
    before = {p.name: p.stat().st_mtime_ns for p in (baseline_run["run"] / "checkpoints").iterdir()}
    log_before = (baseline_run["run"] / "log.jsonl").read_bytes()
    raw = tiny_train_config(baseline_run["run"], corpus_dir)
    raw["model"].update(arch="chiar", routing="soft")
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c2.yaml", raw))], "arch 'baseline'")
    assert {p.name: p.stat().st_mtime_ns for p in (baseline_run["run"] / "checkpoints").iterdir()} == before
    assert (baseline_run["run"] / "log.jsonl").read_bytes() == log_before


def test_resume_from_a_model_only_checkpoint_or_a_wrong_size(
    tmp_path: Path, corpus_dir: Path, baseline_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_train_config(tmp_path / "run", corpus_dir, resume=str(baseline_run["export"]))
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], "without training state")
    ckpt = sorted((baseline_run["run"] / "checkpoints").iterdir())[-1]
    raw = tiny_train_config(tmp_path / "run", corpus_dir, resume=str(ckpt))
    raw["model"]["d_model"] = 64
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], "d_model (32 vs 64)")
    raw = tiny_train_config(tmp_path / "run", corpus_dir, resume=str(tmp_path / "nowhere"))
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], "resume: checkpoint directory not found")
    assert not (tmp_path / "run").exists()


def test_resume_never_refuses_to_overwrite_a_run(
    tmp_path: Path, corpus_dir: Path, baseline_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_train_config(baseline_run["run"], corpus_dir, resume="never")
    _fails(capsys, ["train", "--config", str(write_config(tmp_path / "c.yaml", raw))], "already holds a run")


def test_eval_and_calibrate_bad_checkpoints(
    tmp_path: Path, corpus_dir: Path, baseline_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = [{"name": "test", "path": str(corpus_dir / "test.txt")}]
    cfg = write_config(tmp_path / "e.yaml", {"checkpoint": str(tmp_path / "missing"), "data": data})
    _fails(capsys, ["eval", "--config", str(cfg)], "checkpoint:", "does not exist")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((baseline_run["export"] / name).read_bytes())
    (broken / "model.safetensors").write_bytes((baseline_run["export"] / "model.safetensors").read_bytes()[:100])
    cfg = write_config(tmp_path / "e.yaml", {"checkpoint": str(broken), "data": data})
    _fails(capsys, ["eval", "--config", str(cfg)], "model.safetensors", "truncated")

    template = tiny_train_config(tmp_path / "chiar", corpus_dir)
    template["model"].update(arch="chiar", routing="threshold", n_layers=4)
    tpl = write_config(tmp_path / "tpl.yaml", template)
    cal = {"checkpoint": str(baseline_run["export"]), "data": data, "template": str(tpl), "output": str(tmp_path / "out.yaml")}
    _fails(capsys, ["calibrate", "--config", str(write_config(tmp_path / "cal.yaml", cal))], "model.n_layers is 4", "n_layers=3")
    assert not (tmp_path / "out.yaml").exists()
    template["model"]["arch"] = "baseline"
    write_config(tpl, template)
    _fails(capsys, ["calibrate", "--config", str(tmp_path / "cal.yaml")], "template: model.arch must be 'chiar'")


def test_cli_process_exits_2_with_one_line(tmp_path: Path, corpus_dir: Path) -> None:
    """The real entry point as a process: status 2, one `error:` line, no traceback."""
    raw = tiny_train_config(tmp_path / "run", corpus_dir)
    raw["data"] = [{"name": "wiki", "path": str(tmp_path / "missing.txt")}]
    proc = run_module(["training", "train", "--config", str(write_config(tmp_path / "c.json", raw))])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: data[0] (wiki): file not found") and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_module(["training", "train", "--config", str(tmp_path / "c.json"), "--set", "nonsense=1"])
    assert proc.returncode == 2 and "nonsense: unknown key" in proc.stderr
    assert json.loads((tmp_path / "c.json").read_text())["data"][0]["name"] == "wiki"
