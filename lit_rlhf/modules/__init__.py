"""LightningModules: PPOModule, SFTModule and RewardModelModule."""

from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward import RewardModelModule
from lit_rlhf.modules.sft import SFTModule

__all__ = ["PPOModule", "RewardModelModule", "SFTModule"]
