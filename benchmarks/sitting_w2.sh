#!/usr/bin/env bash
# One W2 sitting: TRL PPO, lit_rlhf native (packed rows, then padded) and lit_rlhf with the vLLM engine
# alternating on W2, then lit_rlhf and TRL on W1 in the same sitting (W1 must not get slower).
#   HARNESS=../shared/bench W1_WORKDIR=~/.cache/w1-bench BENCH_VENVS=~/.cache/w1-bench bash benchmarks/sitting_w2.sh
# Needs the W1 and W2 assets (make_w1_assets.py, make_w2_assets.py), the TRL venv (setup_venvs.sh)
# and, for the vLLM rows, .venv-vllm (make test-vllm builds it; VLLM_PY=none skips those rows).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=$(cd "${HARNESS:-../shared/bench}" && pwd)
export W1_WORKDIR=${W1_WORKDIR:-$HOME/.cache/w1-bench}
VENVS=${BENCH_VENVS:-$HOME/.cache/w1-bench}
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-.venv-vllm/bin/python}
ROUNDS=${ROUNDS:-2}
R=$W1_WORKDIR/results
mkdir -p "$R"
show() { grep -E "^median|^phases|^peak|^useful|ratio" "$R/$1.log" | sed "s/^/$1: /" || tail -5 "$R/$1.log"; }

for i in $(seq 1 "$ROUNDS"); do
  (cd "$HARNESS" && "$VENVS/trl-ppo/bin/python" trl_ppo_w2.py --out "$R/trl_ppo_w2_run$i.json") > "$R/trl_ppo_w2_run$i.log" 2>&1
  show "trl_ppo_w2_run$i"
  "$PY" benchmarks/w2.py --assets "$W1_WORKDIR/w2_assets" --out "$R/lit_rlhf_w2_run$i.json" > "$R/lit_rlhf_w2_run$i.log" 2>&1
  show "lit_rlhf_w2_run$i"
  "$PY" benchmarks/w2.py --no-padding-free --assets "$W1_WORKDIR/w2_assets" --out "$R/lit_rlhf_w2_padded_run$i.json" \
    > "$R/lit_rlhf_w2_padded_run$i.log" 2>&1
  show "lit_rlhf_w2_padded_run$i"
  if [ "$VLLM_PY" != none ]; then
    "$VLLM_PY" benchmarks/w2.py --engine vllm --assets "$W1_WORKDIR/w2_assets" --out "$R/lit_rlhf_vllm_w2_run$i.json" \
      > "$R/lit_rlhf_vllm_w2_run$i.log" 2>&1
    show "lit_rlhf_vllm_w2_run$i"
  fi
done
"$PY" benchmarks/w1.py --assets "$W1_WORKDIR/w1_assets" --out "$R/lit_rlhf_w1_w2sitting.json" > "$R/lit_rlhf_w1_w2sitting.log" 2>&1
show lit_rlhf_w1_w2sitting
"$VENVS/trl-ppo/bin/python" "$HARNESS/trl_ppo_w1.py" --assets "$W1_WORKDIR/w1_assets" --out "$R/trl_ppo_w1_w2sitting.json" \
  > "$R/trl_ppo_w1_w2sitting.log" 2>&1
show trl_ppo_w1_w2sitting
