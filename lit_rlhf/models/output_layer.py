"""The output layer apart from the model: log-probs from the last hidden states, the output layer run
a chunk of tokens at a time (``lit_rlhf.functional.log_probs_from_hidden``), so that a 150k vocabulary
never holds ``[B, A, V]`` fp32 logits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

# architectures whose causal-LM forward returns ``lm_head(hidden)`` unchanged (no logit scaling or
# soft-capping), so that the output layer may run apart from the model, in chunks
CHUNKED_HEAD_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "smollm3"}
)


def chunked_head(model: nn.Module) -> nn.Linear | None:
    """``model``'s output layer if it may run apart from the model: a plain ``nn.Linear`` that the
    model's forward applies as it is (an architecture in ``CHUNKED_HEAD_MODELS``) and no layer
    wrapped by FSDP (its weights are whole only inside its forward); else None."""
    if model.config.model_type not in CHUNKED_HEAD_MODELS:
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or wrapped_for_sharding(model):
        return None
    return head


@contextlib.contextmanager
def hidden_states_out(head: nn.Module) -> Iterator[None]:
    """Within the block the output layer passes its input through: the model's ``logits`` are the last
    hidden states (of the positions it keeps)."""
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: Tensor) -> Tensor:
    return hidden


def wrapped_for_sharding(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) wraps a layer of ``model``."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())
