#!/usr/bin/env bash
# One W2 carry-over sitting: TRL PPO, lit_rlhf synchronous and lit_rlhf with asynchronous rollouts
# (rollout.asynchronous: max_staleness 1, carry-over, segments of SEGMENT tokens) alternating on W2.
#   HARNESS=../shared/bench W1_WORKDIR=~/.cache/w1-bench BENCH_VENVS=~/.cache/w1-bench bash benchmarks/sitting_w2_async.sh
# Needs the W2 assets (make_w2_assets.py) and the TRL PPO venv (setup_venvs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=$(cd "${HARNESS:-../shared/bench}" && pwd)
export W1_WORKDIR=${W1_WORKDIR:-$HOME/.cache/w1-bench}
VENVS=${BENCH_VENVS:-$HOME/.cache/w1-bench}
PY=${PY:-.venv/bin/python}
ROUNDS=${ROUNDS:-2}
SEGMENT=${SEGMENT:-32}
R=$W1_WORKDIR/results
mkdir -p "$R"
show() { grep -E "^median|^phases|^decode|^peak|^useful" "$R/$1.log" | sed "s/^/$1: /" || tail -5 "$R/$1.log"; }

for i in $(seq 1 "$ROUNDS"); do
  (cd "$HARNESS" && "$VENVS/trl-ppo/bin/python" trl_ppo_w2.py --out "$R/trl_ppo_w2_async_sitting_run$i.json") \
    > "$R/trl_ppo_w2_async_sitting_run$i.log" 2>&1
  show "trl_ppo_w2_async_sitting_run$i"
  "$PY" benchmarks/w2.py --assets "$W1_WORKDIR/w2_assets" --harness "$HARNESS" --out "$R/lit_rlhf_w2_sync_run$i.json" \
    > "$R/lit_rlhf_w2_sync_run$i.log" 2>&1
  show "lit_rlhf_w2_sync_run$i"
  "$PY" benchmarks/w2.py --assets "$W1_WORKDIR/w2_assets" --harness "$HARNESS" --max-staleness 1 \
    --segment-tokens "$SEGMENT" --out "$R/lit_rlhf_w2_async_run$i.json" > "$R/lit_rlhf_w2_async_run$i.log" 2>&1
  show "lit_rlhf_w2_async_run$i"
done
