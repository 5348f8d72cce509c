"""One vLLM engine per test session (start-up costs about 30 s on CPU) and the models it serves.

These tests run in the vLLM venv (``make test-vllm``); without vLLM every test here is skipped.
The engine is started with the demo's architecture (head size 32: vLLM's CPU attention supports
32 and up) and receives whatever actor a test pushes.
"""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch

from lit_rlhf.models import Actor, load_tokenizer


def module_of(actor: Actor) -> types.SimpleNamespace:
    """What an engine needs from a PPO module outside a fit: the actor and its device."""
    return types.SimpleNamespace(actor=actor, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """The embedded task, reduced: data and a briefly trained SFT policy (about a minute)."""
    from lit_rlhf import SFTDataModule, SFTModule
    from lit_rlhf.tasks.demo import prepare

    root = tmp_path_factory.mktemp("demo")
    prepare(str(root), sft_size=8192, pairs=256)
    sft = SFTModule(
        models={"path": str(root / "base")},
        optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95)), "warmup_steps": 10},
        export_dir=str(root / "sft"),
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=150,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    data = SFTDataModule(str(root / "sft.jsonl"), batch_size=128, max_length=16)
    trainer.fit(sft, datamodule=data)
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
    engine.start(module_of(Actor.from_pretrained(demo_assets["sft"], tok)))
    yield engine
    engine.shutdown()
