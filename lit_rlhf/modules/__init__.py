"""LightningModules: PPOModule (and, with the embedded pipeline, SFTModule and RewardModelModule)."""

from lit_rlhf.modules.ppo import PPOModule

__all__ = ["PPOModule"]
