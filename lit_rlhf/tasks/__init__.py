"""The offline tiny-model kit (and, later, the embedded task)."""

from lit_rlhf.tasks.tiny import (
    CHAT_TEMPLATE,
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    build_causal_lm,
    build_sequence_classifier,
    chat_tokenizer,
    qwen2_config,
    save_tiny_models,
    tiny_llama_config,
    train_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CHAT_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "chat_tokenizer",
    "build_causal_lm",
    "build_sequence_classifier",
    "save_tiny_models",
    "qwen2_config",
    "tiny_llama_config",
    "train_tokenizer",
]
