"""Paper-reproduction experiments (EXPERIMENTS.md): ablation, routing collapse, mixed data, efficiency, figures."""
