"""LightningDataModules for prompts (PPO), SFT pairs and preference pairs."""

from lit_rlhf.data.files import load_records
from lit_rlhf.data.prompts import PromptDataModule

__all__ = ["PromptDataModule", "load_records"]
