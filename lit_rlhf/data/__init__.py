"""LightningDataModules for prompts (PPO), SFT pairs and preference pairs."""

from lit_rlhf.data.files import load_records
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.sft import PreferenceDataModule, SFTDataModule

__all__ = ["PreferenceDataModule", "PromptDataModule", "SFTDataModule", "load_records"]
