#!/usr/bin/env bash
# The embedded demo's GRPO (configs/grpo_tiny.yaml, from make demo's SFT policy) synchronous and with
# asynchronous rollouts (max_staleness 1, carry-over, segments of 2 tokens), SEEDS seeds each: held-out
# accuracy before training and after the last rollout, per run (learning must not change).
#   bash benchmarks/demo_async.sh            # needs assets/demo/sft (make demo or make assets)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/demo_async}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
ASYNC=(--model.init_args.rollout.asynchronous.max_staleness 1 --model.init_args.rollout.asynchronous.segment_tokens 2
  --model.init_args.algorithm.rollout_correction decoupled)
for seed in $SEEDS; do
  for mode in sync async; do
    extra=()
    [ "$mode" = async ] && extra=("${ASYNC[@]}")
    root="$OUT/$mode-$seed"
    rm -rf "$root"; mkdir -p "$OUT"
    "$PY" train.py fit --config configs/grpo_tiny.yaml --seed_everything "$seed" --trainer.logger false \
      --trainer.default_root_dir "$root" --trainer.enable_progress_bar false \
      --model.init_args.val_before_train true "${extra[@]}" > "$root.log" 2>&1
    "$PY" - "$root" "$mode" "$seed" <<'PYTHON'
import glob, sys
import pandas as pd
root, mode, seed = sys.argv[1:]
frame = pd.read_csv(glob.glob(f"{root}/version_*/metrics.csv")[0])
points = frame.dropna(subset=["val/accuracy"])["val/accuracy"].tolist()
stale = frame["rollout/staleness_max"].dropna().max() if "rollout/staleness_max" in frame else 0
print(f"{mode} seed {seed}: held-out accuracy {points[0]:.3f} -> {points[-1]:.3f} (staleness max {stale:.0f})")
PYTHON
  done
done
