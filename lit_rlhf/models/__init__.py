"""Thin wrappers over transformers and peft: the actor, the value model, loading and export."""

from lit_rlhf.models.actor import Actor, GenerationOutput, action_mask_from_responses
from lit_rlhf.models.loading import load_tokenizer, position_ids_from_mask
from lit_rlhf.models.value import ValueModel
from lit_rlhf.settings import GenerationSettings, LoadSettings, LoraSettings

__all__ = [
    "Actor",
    "GenerationOutput",
    "GenerationSettings",
    "LoadSettings",
    "LoraSettings",
    "ValueModel",
    "action_mask_from_responses",
    "load_tokenizer",
    "position_ids_from_mask",
]
