"""Run every experiment in order (ablation, routing collapse, mixed data, efficiency, figures).

Later experiments reuse the ablation's cached runs (baseline, calibration, CHIAR rows).

    python -m experiments.run_all --size cpu --publish
"""

from __future__ import annotations

import sys
import time

from experiments import ablation, efficiency, figures, mixed, routing_collapse

EXPERIMENTS = {
    "ablation": ablation.main,
    "routing_collapse": routing_collapse.main,
    "mixed": mixed.main,
    "efficiency": efficiency.main,
    "figures": figures.main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    for name, fn in EXPERIMENTS.items():
        t = time.perf_counter()
        print(f"=== {name}", flush=True)
        fn(argv)
        print(f"=== {name} done in {time.perf_counter() - t:.0f}s (total {time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
