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


def fsdp2_setup(mesh, precision: str | None) -> tuple:
    """``(data-parallel mesh, mixed-precision policy)`` for ``shard_model`` under ModelParallelStrategy.

    bf16-mixed training computes in bf16 and reduces gradients in fp32; tensor parallelism is refused.
    """
    if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "lit_rlhf shards with FSDP2 only: set ModelParallelStrategy(data_parallel_size=<world size>, "
            "tensor_parallel_size=1)"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = None
    if precision is not None and "bf16-mixed" in str(precision):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return (mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh), policy


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


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (an FSDP2 shard is all-gathered: a collective, every rank calls it)."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The causal LM's weights under their Hugging Face names, one whole tensor at a time, LoRA merged.

    For pushing a trained policy to an inference engine: a LoRA layer yields ``W + scale * B @ A``
    under the base layer's name (the model itself is not touched); an FSDP2-sharded weight is
    gathered when its turn comes and can be freed once the caller has used it, so no second full
    copy of the model is ever held. Every rank must iterate (the gathers are collectives).
    """
    inner = hf_model(model)
    lora_layers = {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for name, param in inner.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if ".lora_" in name or "lora_magnitude" in name:
            continue
        tensor = _full(param)
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
            layer = lora_layers[owner]
            if leaf == "weight" and not getattr(layer, "merged", False):
                tensor = tensor + _lora_delta(layer).to(tensor.dtype)
            name = f"{owner}.{leaf}"
        yield name, tensor


def _lora_delta(layer: nn.Module) -> torch.Tensor:
    """``scale * B @ A`` of a peft LoRA linear layer's active adapters (what merging adds to its weight)."""
    delta = None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a, b = _full(layer.lora_A[adapter].weight), _full(layer.lora_B[adapter].weight)
        update = (b.float() @ a.float()) * layer.scaling[adapter]
        if getattr(layer, "fan_in_fan_out", False):
            update = update.T
        delta = update if delta is None else delta + update
    return delta if delta is not None else torch.zeros(())
