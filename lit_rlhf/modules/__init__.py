"""LightningModules: PPOModule, SFTModule, RewardModelModule and DPOModule."""

from lit_rlhf.modules.dpo import DPOModule
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward import RewardModelModule
from lit_rlhf.modules.sft import SFTModule
from lit_rlhf.quiet import quiet
from lit_rlhf.settings import DPOModelSettings, DPOSettings

quiet()  # before the user builds a Trainer: no adverts, no known-harmless warnings (see lit_rlhf.quiet)

__all__ = ["DPOModelSettings", "DPOModule", "DPOSettings", "PPOModule", "RewardModelModule", "SFTModule"]
