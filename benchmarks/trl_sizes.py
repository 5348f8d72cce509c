"""TRL's side of the cost curve: the shared harness's TRL PPO script at other rollout sizes.

    $BENCH_VENVS/trl-ppo/bin/python benchmarks/trl_sizes.py --harness ../shared/bench \\
        --prompts 128 --response-len 48 -- --out trl_ppo_w1_p128_r48_run1.json

Run with the TRL virtual environment the harness's ``setup_venvs.sh`` builds. It changes only the
workload's sizes in the harness's spec (sequences per iteration, mini-batch size = a quarter of
them, sampled tokens) and then runs the harness's ``trl_ppo_w1.py`` unchanged, with the arguments
after ``--``. lit_rlhf's own benchmark (``w1.py``) takes the same sizes as ``--prompts`` and
``--response-len``.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", type=Path, required=True, help="shared bench folder with trl_ppo_w1.py")
    parser.add_argument("--prompts", type=int, default=64, help="sequences per iteration (W1: 64)")
    parser.add_argument("--response-len", type=int, default=48, help="sampled tokens per sequence (W1: 48)")
    args, rest = parser.parse_known_args()
    if args.prompts % 4:
        parser.error(f"--prompts must split into 4 mini-batches, got {args.prompts}")
    script = args.harness / "trl_ppo_w1.py"
    if not script.is_file():
        sys.exit(f"{script} not found: --harness must point at the shared bench folder")
    sys.path.insert(0, str(args.harness.resolve()))
    import w1_common

    w1_common.W1.update(rollout_batch=args.prompts, minibatch_size=args.prompts // 4, response_len=args.response_len)
    sys.argv = [str(script), *[a for a in rest if a != "--"]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
