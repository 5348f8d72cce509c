"""The offline tiny-model kit (and, later, the embedded task)."""

from lit_rlhf.tasks.tiny import (
    CHAT_TEMPLATE,
    build_causal_lm,
    build_sequence_classifier,
    save_tiny_models,
    tiny_llama_config,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "build_causal_lm",
    "build_sequence_classifier",
    "save_tiny_models",
    "tiny_llama_config",
    "train_tokenizer",
]
