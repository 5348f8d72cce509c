"""Small PPO set-ups shared by the module, rollout and CLI tests."""

from __future__ import annotations

import lightning as L
import torch

from lit_rlhf import PPOModule, PromptDataModule

SEVEN = "7"


class SevensPPO(PPOModule):
    """A rule-based reward: the fraction of response characters that are '7' (a two-argument override)."""

    def compute_reward(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([r.count(SEVEN) / max(1, len(r)) for r in responses])


def sevens_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.tensor([r.count(SEVEN) / max(1, len(r)) for r in responses])


SMALL = {
    "generation": {"max_new_tokens": 4},
    "rollout": {"rollout_batch_size": 16, "score_micro_batch_size": 8},
    "algorithm": {"mini_batch_size": 8, "micro_batch_size": 4, "ppo_epochs": 2},
    "kl": {"coef": 0.01},
}


def small_module(assets: dict[str, str], cls: type[PPOModule] = SevensPPO, **overrides) -> PPOModule:
    """A PPO module on the tiny assets; each group in ``overrides`` (a dict) updates the small defaults."""
    groups = {name: dict(fields) for name, fields in SMALL.items()}
    groups["models"] = {"actor_path": assets["policy"], "new_value_head": True}  # the critic starts from the policy
    groups["optim"] = {
        "actor": {"optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3)},
        "critic": {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3)},
    }
    for name, value in overrides.items():
        if isinstance(value, dict) and name in groups:
            groups[name].update(value)
        else:
            groups[name] = value
    return cls(**groups)


def trainer(tmp_path, max_epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="logs"),
        enable_progress_bar=kwargs.pop("enable_progress_bar", False),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=kwargs.pop("log_every_n_steps", 1),
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        **kwargs,
    )


def datamodule(assets: dict[str, str], **kwargs) -> PromptDataModule:
    return PromptDataModule(assets["prompts"], val_path=assets["val_prompts"], val_batch_size=16, **kwargs)


def fit(tmp_path, module, epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    """Fit ``module`` (built by the ``make`` fixture, which keeps its assets) for ``epochs`` rollouts, seeded."""
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs, callbacks, **kwargs)
    t.fit(module, datamodule=datamodule(module.assets))
    return t
