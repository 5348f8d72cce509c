#!/usr/bin/env bash
# One benchmark sitting: lit_rlhf and TRL alternating on W1 and W1-GRPO, then the cost curve for both.
#   HARNESS=../shared/bench W1_WORKDIR=~/.cache/w1-bench BENCH_VENVS=~/.cache/w1-bench bash benchmarks/sitting.sh
# Needs the W1 assets (make_w1_assets.py) and the TRL venvs (setup_venvs.sh) from the harness.
# Results: $W1_WORKDIR/results/<name>_run<i>.json (+ .log); summarise with the harness's summarize.py.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=$(cd "${HARNESS:-../shared/bench}" && pwd)
export W1_WORKDIR=${W1_WORKDIR:-$HOME/.cache/w1-bench}
VENVS=${BENCH_VENVS:-$HOME/.cache/w1-bench}
PY=${PY:-python}
ROUNDS=${ROUNDS:-3}
CURVE=${CURVE:-"64:96 64:192 128:48 256:48"}
R=$W1_WORKDIR/results
A=$W1_WORKDIR/w1_assets
mkdir -p "$R"
show() { grep -E "^median|^peak|^matmul|ratio" "$R/$1.log" | sed "s/^/$1: /" || tail -5 "$R/$1.log"; }

"$VENVS/trl-ppo/bin/python" "$HARNESS/matmul_peak.py" --out matmul_peak.json > /dev/null
for i in $(seq 1 "$ROUNDS"); do
  "$VENVS/trl-ppo/bin/python" "$HARNESS/trl_ppo_w1.py" --assets "$A" --out "trl_ppo_w1_run$i.json" > "$R/trl_ppo_w1_run$i.log" 2>&1
  show "trl_ppo_w1_run$i"
  "$PY" benchmarks/w1.py --assets "$A" --out "$R/lit_rlhf_w1_run$i.json" > "$R/lit_rlhf_w1_run$i.log" 2>&1
  show "lit_rlhf_w1_run$i"
  "$VENVS/trl-grpo/bin/python" "$HARNESS/trl_grpo_w1.py" --assets "$A" --out "trl_grpo_w1_run$i.json" > "$R/trl_grpo_w1_run$i.log" 2>&1
  show "trl_grpo_w1_run$i"
  "$PY" benchmarks/w1.py --variant grpo --assets "$A" --out "$R/lit_rlhf_grpo_w1_run$i.json" > "$R/lit_rlhf_grpo_w1_run$i.log" 2>&1
  show "lit_rlhf_grpo_w1_run$i"
done
for point in $CURVE; do
  p=${point%:*} r=${point#*:}
  "$VENVS/trl-ppo/bin/python" benchmarks/trl_sizes.py --harness "$HARNESS" --prompts "$p" --response-len "$r" -- \
    --assets "$A" --out "curve_trl_p${p}_r${r}.json" > "$R/curve_trl_p${p}_r${r}.log" 2>&1
  show "curve_trl_p${p}_r${r}"
  "$PY" benchmarks/w1.py --assets "$A" --prompts "$p" --response-len "$r" --out "$R/curve_lit_p${p}_r${r}.json" \
    > "$R/curve_lit_p${p}_r${r}.log" 2>&1
  show "curve_lit_p${p}_r${r}"
done
"$VENVS/trl-ppo/bin/python" "$HARNESS/matmul_peak.py" --out matmul_peak_after.json > /dev/null
