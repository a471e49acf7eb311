"""`python -m training {train,calibrate,eval,plot} --config FILE [--set key=value ...]`.

Bad input ends with one `error: <field>: <problem>` line on stderr and exit status 2; so does a
failed write (disk full, file-size limit, read-only directory), naming the path.
"""

from __future__ import annotations

import argparse
import json
import sys

from model import CheckpointError, ConfigError
from model.device import DeviceError
from training.errors import TrainingError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train or resume a model (torchrun-aware)",
        "calibrate": "measure entropy percentiles on a frozen checkpoint; write a calibrated CHIAR config",
        "eval": "token PPL, word PPL and bits/byte of a checkpoint on held-out text",
        "plot": "PNG figures from run logs and a routing heatmap",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help="YAML or JSON config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted path, e.g. model.d_model=64 or data.0.weight=2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args.command, args.config, args.overrides)
    except (TrainingError, ConfigError, CheckpointError, DeviceError) as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a write outside the checkpoint writer failed (log file, plots): name the path
        where = exc.filename if exc.filename is not None else "I/O"
        print(f"error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))


def _run(command: str, config: str, overrides: list[str]) -> int:
    from training.config import CalibrateConfig, EvalConfig, PlotConfig, TrainConfig, load_config

    if command == "train":
        from training.loop import train

        summary = train(load_config(TrainConfig, config, overrides))
        if summary["rank"] == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=1, default=str))
    elif command == "calibrate":
        from training.calibrate import calibrate

        report = calibrate(load_config(CalibrateConfig, config, overrides))
        for layer in report["layers"]:
            print(f"layer {layer['layer']}: p33 {layer['p33']:.4f}  p67 {layer['p67']:.4f}  tau {layer['threshold']:.4f}")
        print(f"wrote {report['output']}")
    elif command == "eval":
        from training.evaluate import format_report, run_eval

        print(format_report(run_eval(load_config(EvalConfig, config, overrides))))
    else:
        from training.plots import run_plot

        for path in run_plot(load_config(PlotConfig, config, overrides)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
