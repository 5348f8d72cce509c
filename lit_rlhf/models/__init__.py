"""Thin wrappers over transformers and peft: the actor, the value model, loading and export."""

from lit_rlhf.models.actor import Actor, GenerationOutput, response_texts
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
    "load_tokenizer",
    "position_ids_from_mask",
    "response_texts",
]
