#!/usr/bin/env bash
# Demo checkpoints (`make demo-checkpoints`): baseline-small -> calibrate -> chiar-small, both with
# one shared tokenizer, then WikiText-2 test PPL of both and the figures. Default protocol: train on
# WikiText-2 valid, evaluate on WikiText-2 test. CPU recipe: 500 steps per model (docs/TRAINING.md).
#
# Environment knobs:
#   PY=.venv/bin/python            interpreter
#   RUNS=runs/demo                 run directories, calibrated config, eval reports, plots
#   CKPTS=checkpoints              where baseline-small/ and chiar-small/ are exported
#   TRAIN_SET="--set max_steps=4000 --set batch_size=32"   extra overrides for both trainings (GPU)
#   EVAL_SET="--set data.0.max_bytes=100000"                extra overrides for both evals
#   SKIP_EVAL=1 / SKIP_PLOTS=1     stop after training
set -euo pipefail
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/demo}
CKPTS=${CKPTS:-checkpoints}
read -r -a TRAIN_SET <<<"${TRAIN_SET:-}"
read -r -a EVAL_SET <<<"${EVAL_SET:-}"

set -x
"$PY" -m training train --config training/configs/baseline-small.yaml \
  --set "out_dir=$RUNS/baseline-small" --set "export_dir=$CKPTS/baseline-small" "${TRAIN_SET[@]}"
"$PY" -m training calibrate --config training/configs/calibrate-small.yaml \
  --set "checkpoint=$CKPTS/baseline-small" \
  --set "output=$RUNS/chiar-small.calibrated.yaml" --set "report=$RUNS/chiar-small.calibration.json"
"$PY" -m training train --config "$RUNS/chiar-small.calibrated.yaml" \
  --set "out_dir=$RUNS/chiar-small" --set "export_dir=$CKPTS/chiar-small" \
  --set "tokenizer.path=$CKPTS/baseline-small" "${TRAIN_SET[@]}"
if [[ "${SKIP_EVAL:-0}" != 1 ]]; then
  # the baseline has no gating: its inference path computes the same logits, so score it once
  "$PY" -m training eval --config training/configs/eval-wikitext2.yaml --set "paths=[reference]" \
    --set "checkpoint=$CKPTS/baseline-small" --set "output=$RUNS/eval-baseline-small.json" "${EVAL_SET[@]}"
  "$PY" -m training eval --config training/configs/eval-wikitext2.yaml \
    --set "checkpoint=$CKPTS/chiar-small" --set "output=$RUNS/eval-chiar-small.json" "${EVAL_SET[@]}"
fi
if [[ "${SKIP_PLOTS:-0}" != 1 ]]; then
  "$PY" -m training plot --config training/configs/plots-demo.yaml --set "out_dir=$RUNS/plots" \
    --set "runs=[$RUNS/baseline-small, $RUNS/chiar-small]" --set "heatmap.checkpoint=$CKPTS/chiar-small"
fi
