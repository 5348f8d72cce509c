#!/usr/bin/env bash
# One W3 sitting (multi-turn tool use): the fp32 matmul ceiling, then TRL GRPO with tools and lit_rlhf
# alternating (TRL, lit_rlhf, lit_rlhf recomputing the old log-probs with a forward as TRL does, TRL, ...),
# then the ceiling again and the shared summary table. RECOMPUTE=0 leaves out the recomputing runs.
#   HARNESS=../shared/bench W1_WORKDIR=~/.cache/w1-bench BENCH_VENVS=~/.cache/w1-bench bash benchmarks/sitting_w3.sh
# Needs the W3 assets (make_w3_assets.py) and the TRL GRPO venv (setup_venvs.sh: $BENCH_VENVS/trl-grpo, or
# TRL_PY=...). ROUNDS (default 2) pairs of runs. The machine may be shared: before every run the script
# waits (at most QUIET_WAIT s, default 900; 0 = never) until the CPUs are idle, and it records, per run,
# the CPU cores that other processes used meanwhile (results/load/<run>.json; lit_rlhf also records it per
# iteration).
# A run during which others used more than FOREIGN_MAX cores on average (default 0.05) is moved to
# results/contended/ and taken again, at most TRIES times (default 4; the last try is kept whatever its load).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=$(cd "${HARNESS:-../shared/bench}" && pwd)
export W1_WORKDIR=${W1_WORKDIR:-$HOME/.cache/w1-bench}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
VENVS=${BENCH_VENVS:-$HOME/.cache/w1-bench}
TRL_PY=${TRL_PY:-$VENVS/trl-grpo/bin/python}
PY=${PY:-.venv/bin/python}
ROUNDS=${ROUNDS:-2}
QUIET_WAIT=${QUIET_WAIT:-900}
FOREIGN_MAX=${FOREIGN_MAX:-0.05}
TRIES=${TRIES:-4}
RECOMPUTE=${RECOMPUTE:-1}
R=$W1_WORKDIR/results
A=$W1_WORKDIR/w3_assets
mkdir -p "$R/load"  # not results/*_run*.json: summarize.py reads those as results
[ -f "$A/manifest.json" ] || { echo "no W3 assets in $A: run $HARNESS/make_w3_assets.py first" >&2; exit 1; }

# busy share (%) of all CPUs over $1 s
busy() {
  local a b
  read -r _ a1 a2 a3 a4 a5 a6 a7 a8 _ < /proc/stat; sleep "$1"; read -r _ b1 b2 b3 b4 b5 b6 b7 b8 _ < /proc/stat
  local idle=$(((b4 + b5) - (a4 + a5))) total=$(((b1 + b2 + b3 + b4 + b5 + b6 + b7 + b8) - (a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8)))
  echo $((100 * (total - idle) / (total > 0 ? total : 1)))
}
# wait until the CPUs are idle (< 10 % busy, three 2-s samples in a row), at most QUIET_WAIT s
wait_quiet() {
  local start=$SECONDS ok=0
  while ((SECONDS - start < QUIET_WAIT)); do
    if (($(busy 2) < 10)); then ok=$((ok + 1)); ((ok >= 3)) && { echo "  (quiet after $((SECONDS - start)) s)"; return 0; }; else ok=0; fi
  done
  echo "  (not quiet after $QUIET_WAIT s: running anyway)"
}
# run "$@" (one benchmark) and write $R/load/$name.json: wall s, its own CPU s, and other processes' CPU cores
measured() {
  local name=$1; shift
  python3 - "$R/load/$name.json" "$@" <<'EOF'
import json, os, resource, subprocess, sys, time
def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
b0, t0 = busy(), time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall, b1 = time.perf_counter() - t0, busy()
own = resource.getrusage(resource.RUSAGE_CHILDREN)
own = own.ru_utime + own.ru_stime
out = {"wall_s": round(wall, 1), "own_cpu_s": round(own, 1), "foreign_cpu_cores": round(max(0.0, b1 - b0 - own) / wall, 3),
       "loadavg_after": os.getloadavg(), "rc": rc}
json.dump(out, open(sys.argv[1], "w"))
print(f"  load: {out}")
sys.exit(rc if rc else (75 if out["foreign_cpu_cores"] > float(os.environ["FOREIGN_MAX"]) else 0))
EOF
}
# one benchmark run, taken again while other processes disturbed it: run_clean NAME COMMAND...
run_clean() {
  local name=$1 try rc; shift
  for try in $(seq 1 "$TRIES"); do
    wait_quiet
    rc=0; FOREIGN_MAX=$FOREIGN_MAX measured "$name" "$@" > "$R/$name.log" 2>&1 || rc=$?
    if ((rc == 75)) && ((try < TRIES)); then
      mkdir -p "$R/contended"
      for f in "$R/$name".*; do mv "$f" "$R/contended/$(basename "$f" | sed "s/^$name/$name.try$try/")"; done
      mv "$R/load/$name.json" "$R/contended/$name.try$try.load.json"
      echo "  $name try $try disturbed ($(grep -o 'foreign_cpu_cores[^,]*' "$R/contended/$name.try$try.load.json")): again"
      continue
    fi
    ((rc == 0 || rc == 75)) || { tail -20 "$R/$name.log"; exit 1; }
    return 0
  done
}
show() { grep -E "^median|^peak|^matmul|^useful|ratio to|^tool calls|^other" "$R/$1.log" | sed "s/^/$1: /" || tail -5 "$R/$1.log"; }

echo "cpu capability: $($PY -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'), $(nproc) cores"
wait_quiet
(cd "$HARNESS" && "$TRL_PY" matmul_peak.py --out matmul_peak_w3_before.json) > "$R/matmul_peak_w3_before.log" 2>&1
grep -iE "2048|headline" "$R/matmul_peak_w3_before.log" | head -2
for i in $(seq 1 "$ROUNDS"); do
  # the harness's script writes its JSON under $W1_WORKDIR/results itself
  run_clean "trl_grpo_w3_run$i" bash -c "cd '$HARNESS' && exec '$TRL_PY' trl_grpo_w3.py --assets '$A' --out trl_grpo_w3_run$i.json"
  show "trl_grpo_w3_run$i"; grep "load:" "$R/trl_grpo_w3_run$i.log"
  run_clean "lit_rlhf_w3_run$i" "$PY" benchmarks/w3.py --assets "$A" --harness "$HARNESS" --out "$R/lit_rlhf_w3_run$i.json"
  show "lit_rlhf_w3_run$i"; grep "load:" "$R/lit_rlhf_w3_run$i.log"
  if ((RECOMPUTE)); then
    run_clean "lit_rlhf_w3_recompute_run$i" "$PY" benchmarks/w3.py --recompute-old-log-probs --assets "$A" \
      --harness "$HARNESS" --out "$R/lit_rlhf_w3_recompute_run$i.json"
    show "lit_rlhf_w3_recompute_run$i"; grep "load:" "$R/lit_rlhf_w3_recompute_run$i.log"
  fi
done
wait_quiet
(cd "$HARNESS" && "$TRL_PY" matmul_peak.py --out matmul_peak_w3_after.json) > "$R/matmul_peak_w3_after.log" 2>&1
grep -iE "2048|headline" "$R/matmul_peak_w3_after.log" | head -2
(cd "$HARNESS" && "$TRL_PY" summarize.py) > "$R/summary_w3.log" 2>&1 || tail -5 "$R/summary_w3.log"
sed -n '/^W3 (multi-turn/,/^W3: tokens/p' "$R/summary.md"
