"""Build the offline tiny assets: tokenizer, tiny policy and reward model, prompt files.

python -m lit_rlhf.tasks.assets --out assets/tiny
"""

from __future__ import annotations

import argparse
import os

from lit_rlhf.tasks.arithmetic import corpus, prompt_records, split_problems, write_jsonl
from lit_rlhf.tasks.tiny import save_tiny_models, tiny_llama_config, train_tokenizer


def build_tiny_assets(
    out: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, num_heads: int = 4
) -> dict[str, str]:
    """Write ``policy/``, ``reward/``, ``prompts.jsonl`` and ``val_prompts.jsonl`` under ``out``."""
    tokenizer = train_tokenizer(corpus(), kind="char")
    config = tiny_llama_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    paths = save_tiny_models(out, tokenizer, config, seed=seed)
    splits = split_problems(seed)
    paths["prompts"] = os.path.join(out, "prompts.jsonl")
    paths["val_prompts"] = os.path.join(out, "val_prompts.jsonl")
    write_jsonl(paths["prompts"], prompt_records(splits["ppo"]))
    write_jsonl(paths["val_prompts"], prompt_records(splits["dev"][:64]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/tiny", help="output directory")
    args = parser.parse_args()
    for name, path in build_tiny_assets(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
