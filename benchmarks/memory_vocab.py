"""Peak memory of scoring and of a training micro-step with a 151,936-token output layer (Qwen2.5's
vocabulary): the output layer in chunks (``Actor.chunked_logits``, the default) against the full
``[B, A, V]`` logits.

Each measurement runs in a process of its own: the model (Qwen2.5-0.5B's widths and vocabulary, 2 layers,
fp32, random weights) is built, the peak resident memory is reset (``/proc/self/clear_refs``), one step
runs, and the peak above the memory before it is reported.

    .venv/bin/python benchmarks/memory_vocab.py [--rows 8 --prompt 64 --response 256] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(mode: str, chunked: bool, rows: int, prompt: int, response: int) -> dict:
    import torch

    from lit_rlhf.models import Actor
    from lit_rlhf.tasks import qwen2_config

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM

    config = qwen2_config(num_hidden_layers=2, tie_word_embeddings=False)
    actor = Actor(AutoModelForCausalLM.from_config(config), [0], 0)
    actor.chunked_logits = chunked
    seq = torch.randint(1, config.vocab_size, (rows, prompt + response))
    mask = torch.ones_like(seq)
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
        f.write("5")
    start = time.perf_counter()
    if mode == "scoring":
        with torch.no_grad():
            actor(seq, mask, response)
    else:
        out = actor.log_probs_and_entropy(seq, mask, response, entropy_grad=False)
        out.log_probs.mean().backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (rss_kib("VmHWM") - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # mode chunked: a measurement, in this process
    args = parser.parse_args()
    if args.one:
        mode, chunked = args.one[0], args.one[1] == "1"
        print(json.dumps(measure(mode, chunked, args.rows, args.prompt, args.response)))
        return
    import torch

    results = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vocab": 151936,
        "rows": args.rows,
        "response_tokens": args.response,
        "full_logits_fp32_mib": args.rows * args.response * 151936 * 4 / 2**20,
    }
    for mode in ("scoring", "training"):
        for chunked in (False, True):
            command = [sys.executable, __file__, "--one", mode, str(int(chunked))]
            command += ["--rows", str(args.rows), "--prompt", str(args.prompt), "--response", str(args.response)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            results[f"{mode}_{'chunked' if chunked else 'full'}"] = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("scoring", "training"):
        full, chunked = results[f"{mode}_full"]["peak_mib"], results[f"{mode}_chunked"]["peak_mib"]
        results[f"{mode}_peak_ratio"] = chunked / full
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
