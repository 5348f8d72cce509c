"""One vLLM engine per test session (start-up costs about 30 s on CPU) and the models it serves.

These tests run in the vLLM venv (``make test-vllm``); without vLLM every test here is skipped.
The engine is started with the demo's architecture (head size 32: vLLM's CPU attention supports
32 and up) and receives whatever actor a test pushes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lit_rlhf.models import Actor, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate(engine, input_ids, attention_mask, generation, seed: int):
    """One sample per row of left-padded prompts (row ``i`` seeded ``seed + i``), packed as the runner does."""
    from lit_rlhf.rollout.engines.packing import pack_samples, requests_from_prompts

    seeds = [seed + i for i in range(len(input_ids))]
    requests = requests_from_prompts(input_ids, attention_mask, seeds, generation.stop_token_ids)
    return pack_samples(input_ids, attention_mask, engine.generate(requests, generation), engine.pad_token_id)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """The embedded task's data and its SFT policy, trained with the demo's own recipe
    (``configs/sft_tiny.yaml`` through the CLI: about 3 minutes on 2 cores)."""
    from lit_rlhf.tasks.demo import prepare

    root = tmp_path_factory.mktemp("demo")
    prepare(str(root), pairs=256)
    overrides = {
        "model.init_args.models.path": root / "base",
        "model.init_args.export_dir": root / "sft",
        "data.init_args.path": root / "sft.jsonl",
        "data.init_args.val_path": root / "sft_val.jsonl",
        "trainer.default_root_dir": root / "runs",
        "trainer.logger": "false",
        "trainer.enable_progress_bar": "false",
    }
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "sft_tiny.yaml"),
    ]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {
        "sft": str(root / "sft"),
        "prompts": str(root / "prompts.jsonl"),
        "val_prompts": str(root / "val_prompts.jsonl"),
        "root": str(root),
    }


@pytest.fixture(scope="session")
def engine(demo_assets):
    pytest.importorskip("vllm")
    from lit_rlhf.rollout import VLLMEngine

    engine = VLLMEngine(kv_cache_gib=0.25, max_num_seqs=64)
    tok = load_tokenizer(demo_assets["sft"])
    engine.start(Actor.from_pretrained(demo_assets["sft"], tok), "cpu")
    yield engine
    engine.shutdown()
