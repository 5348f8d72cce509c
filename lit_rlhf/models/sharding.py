"""Sharding the models with FSDP2 (``fully_shard``) and gathering them once per rollout.

Used by ``PPOModule.configure_model`` under Lightning's ``ModelParallelStrategy``; plain torch, no
Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

HEAD_NAMES = ("score", "classifier")


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside ``model`` (unwrapping peft)."""
    return model.base_model.model if hasattr(model, "disable_adapter") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (transformers' ``_no_split_modules`` classes)."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(hf_model(model)).__name__} does not name its decoder layers (_no_split_modules)")
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, mesh, mp_policy=None, separate_backbone: bool = False) -> None:
    """``fully_shard`` each decoder layer, then (optionally) the backbone and the scalar head, then the root.

    ``separate_backbone`` is for models whose backbone and head are called directly (the value
    model): each of them must then be an FSDP unit of its own so that its forward gathers its
    parameters.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    if separate_backbone:
        inner = hf_model(model)
        fully_shard(getattr(inner, inner.base_model_prefix), **kwargs)
        for name in HEAD_NAMES:
            if hasattr(inner, name):
                fully_shard(getattr(inner, name), **kwargs)
    fully_shard(model, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gathered(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep an FSDP2-sharded model's full weights gathered for the whole block (e.g. one rollout's
    generation), instead of all-gathering every layer again for every generated token.

    Costs one full copy of the model's weights per rank while the block runs; a no-op for a model
    that is not sharded (or with ``enabled=False``).
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 auto-wrap (and activation-checkpointing) policy: one unit per transformer decoder layer.

    For Lightning's ``FSDPStrategy`` in YAML: ``auto_wrap_policy: lit_rlhf.models.sharding.decoder_layer_policy``.
    Matches the block classes of Llama, Mistral, Qwen, Gemma, Phi and other transformers decoders.
    """
    return recurse or type(module).__name__.endswith(("DecoderLayer", "Block"))
