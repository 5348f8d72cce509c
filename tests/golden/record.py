"""Record what small PPO (GAE), GRPO and DPO fits compute, for the golden-rollout test.

    python -m tests.golden.record OUT.json

It builds its own tiny assets and trains on one thread; the test runs it with ``MKL_CBWR`` and
``ATEN_CPU_CAPABILITY`` fixed (see ``test_golden.py``), so the numbers do not depend on the CPU's
vector extensions. ``tests/golden/rollouts.json`` was written by this script from the code as it
was before the rollout moved into the module; refactors of the rollout must reproduce it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lit_rlhf import DPOModule, PPOModule, PreferenceDataModule, PromptDataModule  # noqa: E402
from lit_rlhf.rewards import RewardFunction, RewardModel  # noqa: E402
from lit_rlhf.tasks.arithmetic import preference_records, split_problems, write_jsonl  # noqa: E402
from lit_rlhf.tasks.assets import build_tiny_assets  # noqa: E402

ROLLOUTS = 3
# the per-row and per-token tensors of each rollout's experience (the trainable-token mask under
# whichever name the Experience gives it)
FIELDS = ("sequences", "old_log_probs", "ref_log_probs", "values", "scores", "kl", "rewards", "advantages", "returns")
STEP_METRICS = (
    "policy/loss",
    "policy/entropy",
    "policy/clip_fraction",
    "policy/approx_kl",
    "policy/kl_loss",
    "critic/loss",
    "critic/grad_norm",
    "policy/grad_norm",
)
ROLLOUT_METRICS = ("reward/mean", "reward/std", "rollout/kl", "rollout/response_length", "rollout/kl_coef")
DPO_METRICS = ("dpo/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def digit_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """A dense reward for a random policy: the fraction of the response's characters that are digits."""
    return torch.tensor([sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses])


class Experiences(L.Callback):
    """Each rollout's experience, read at the first mini-batch of its epoch."""

    def __init__(self) -> None:
        self.rollouts: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx:
            return
        exp = module.buffer.experience
        mask = getattr(exp, "loss_mask", None)
        record = {"mask": (exp.loss_mask if mask is None else mask).long().tolist()}
        for name in FIELDS:
            value = getattr(exp, name)
            record[name] = None if value is None else value.tolist()
        self.rollouts.append(record)


def _trainer(root: str, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        **kwargs,
    )


def _steps(trainer: L.Trainer, names: tuple[str, ...]) -> dict[str, list[float]]:
    frame = pd.read_csv(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    return {name: frame[name].dropna().tolist() for name in names if name in frame}


def ppo(assets: dict[str, str], root: str, estimator: str) -> dict:
    """Three rollouts of a small fit: GAE with a reward model (the critic starts from it), or GRPO."""
    L.seed_everything(0, verbose=False)
    gae = estimator == "gae"
    rewards = (
        [RewardModel(assets["reward"]), RewardFunction("lit_rlhf.tasks.arithmetic.exact_match_reward", weight=0.5)]
        if gae
        else [RewardFunction("tests.golden.record.digit_reward")]
    )
    module = PPOModule(
        models={"actor_path": assets["policy"]},
        rewards=rewards,
        generation={"max_new_tokens": 5, "n_samples_per_prompt": 1 if gae else 4},
        rollout={"rollout_batch_size": 8 if gae else 4, "score_micro_batch_size": 8},
        algorithm={"advantage_estimator": estimator, "mini_batch_size": 8, "micro_batch_size": 4, "ppo_epochs": 2},
        kl={"coef": 0.05} if gae else {"coef": 0.02, "penalty": "loss", "estimator": "k3"},
        optim={
            "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)},
            "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3)},
        },
        log_samples_every_n_rollouts=0,
    )
    experiences = Experiences()
    trainer = _trainer(root, [experiences], max_epochs=ROLLOUTS)
    trainer.fit(module, datamodule=PromptDataModule(assets["prompts"], val_path=assets["val_prompts"]))
    steps = _steps(trainer, STEP_METRICS + ROLLOUT_METRICS)
    return {"rollouts": experiences.rollouts, "steps": steps}


def dpo(assets: dict[str, str], root: str) -> dict:
    L.seed_everything(0, verbose=False)
    pairs = os.path.join(root, "pairs.jsonl")
    write_jsonl(pairs, preference_records(split_problems(0)["train"], 48, 2))
    module = DPOModule(models={"path": assets["policy"]}, optim={"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)})
    trainer = _trainer(root, [], max_epochs=2)
    trainer.fit(module, datamodule=PreferenceDataModule(pairs, batch_size=16))
    return {"steps": _steps(trainer, DPO_METRICS)}


def record() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        assets = build_tiny_assets(os.path.join(root, "assets"), hidden_size=32, num_layers=1)
        return {
            "ppo_gae": ppo(assets, os.path.join(root, "gae"), "gae"),
            "grpo": ppo(assets, os.path.join(root, "grpo"), "grpo"),
            "dpo": dpo(assets, os.path.join(root, "dpo")),
        }


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(record(), f)
