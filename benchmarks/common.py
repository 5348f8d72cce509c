"""What the W1 and W2 benchmarks share: pre-tokenised prompts, per-iteration timing, the matmul rate,
and the benchmark's model folders (W1/W2 ship one tokenizer folder beside the models).

Nothing here comes from the shared harness: the benchmarks run lit_rlhf's own training path.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import lightning as L
import torch

from lit_rlhf import PPOModule, PromptDataModule
from lit_rlhf.tasks.machine import matmul_gflops

__all__ = ["TIMED", "WARMUP", "IterationTimer", "TokenPrompts", "cpu_trainer", "matmul_gflops", "model_folders"]

WARMUP, TIMED = 1, 5


def model_folders(assets: Path, workdir: Path) -> dict[str, str]:
    """Copies of ``policy/`` and ``reward/`` with the tokenizer beside each (lit_rlhf loads one per model)."""
    for name in ("policy", "reward"):
        shutil.copytree(assets / name, workdir / name)
        for f in (assets / "tokenizer").iterdir():
            shutil.copy(f, workdir / name / f.name)
    return {"policy": str(workdir / "policy"), "reward": str(workdir / "reward")}


def cpu_trainer(epochs: int, callbacks: list, root: str) -> L.Trainer:
    """The benchmark's Trainer; the run's outputs (the end-of-fit export) go under ``root``."""
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


class TokenPrompts(PromptDataModule):
    """W1's prompts are token ids already (24 each, no padding): serve them as they are."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.ids: list[list[int]] = []

    def setup(self, stage: str) -> None:
        with open(self.hparams.path) as f:
            self.ids = [json.loads(line)["input_ids"] for line in f]
        self.train_prompts = [str(i) for i in range(len(self.ids))]

    def rollout_prompts(self, rollout: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        start = (rollout * batch_size * world_size + rank * batch_size) % (len(self.ids) - batch_size + 1)
        return self.batch(self.ids[start : start + batch_size])

    def stream_prompts(self, positions: list[int], rank: int = 0, world_size: int = 1, count: bool = True) -> dict:
        """Asynchronous rollouts' prompt stream: the prompts in file order, over and over."""
        return self.batch([self.ids[(p * world_size + rank) % len(self.ids)] for p in positions])

    @staticmethod
    def batch(ids: list[list[int]]) -> dict:
        input_ids = torch.tensor(ids)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "num_truncated": torch.tensor(0),
            "prompts": [""] * len(ids),  # the rewards here read responses only
            "columns": {},
        }

    def val_dataloader(self):
        return []


class DigitFractionPPO(PPOModule):
    """W1-GRPO's rule-based reward: the share of digit characters in each response (no reward model)."""

    def compute_reward(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses])


class IterationTimer(L.Callback):
    """Wall time of each epoch (= one W1 iteration) and its split into phases."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.lengths: list[list[int]] = []  # each iteration's response lengths

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        total = time.perf_counter() - self.start
        timing = next(c for c in trainer.callbacks if hasattr(c, "last_timing")).last_timing
        self.lengths.append(module.buffer.experience.loss_mask.sum(-1).tolist())
        rollout = timing["generation_s"] + timing["scoring_s"] + timing["advantages_s"]
        self.seconds.append(total)
        self.phases.append(
            {
                "1_generation": timing["generation_s"],
                "2_scoring": timing["scoring_s"],
                "3_advantages": timing["advantages_s"],
                "4_training": total - rollout,
            }
        )
