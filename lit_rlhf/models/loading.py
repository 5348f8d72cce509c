"""Loading Hugging Face models and tokenizers: paths, dtype, attention, LoRA, 4-bit, pad token.

flash-attn and bitsandbytes are optional (`pip install 'lit_rlhf[gpu]'`); they are looked up only
when a feature that needs them is asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_rlhf.settings import DType, LoadSettings, LoraSettings

log = logging.getLogger(__name__)

GPU_EXTRA_HINT = "install the GPU extra: pip install 'lit_rlhf[gpu]'"


def model_kwargs(settings: LoadSettings) -> dict:
    """Keyword arguments for ``from_pretrained`` (validated: missing extras raise here)."""
    kwargs: dict = {
        "dtype": getattr(torch, settings.dtype),
        "attn_implementation": settings.attn_implementation,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.attn_implementation == "flash_attention_2":
        require_extra("flash_attn", "attn_implementation='flash_attention_2'")
        if not torch.cuda.is_available():
            raise RuntimeError("attn_implementation='flash_attention_2' needs a CUDA GPU; use 'sdpa' on CPU")
    if settings.load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(settings.dtype)
    return kwargs


def require_extra(module: str, feature: str) -> None:
    """Raise ImportError naming the extra when ``module`` (needed by ``feature``) is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{feature} needs the '{module}' package; {GPU_EXTRA_HINT}")


def _four_bit_config(dtype: DType):
    require_extra("bitsandbytes", "load_in_4bit=True")
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit=True needs a CUDA GPU (bitsandbytes 4-bit kernels)")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if dtype == "float32" else getattr(torch, dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def check_model_path(path: str) -> None:
    """Fail early, naming ``path``, when it looks local but does not exist.

    A string that is not an existing directory is taken as a hub id only if it has the hub's
    ``name`` or ``owner/name`` form; with ``HF_HUB_OFFLINE=1`` it must be in the local cache.
    """
    if os.path.isdir(path):
        return
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path)
    if looks_local:
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a directory saved with save_pretrained)")


def load_error(path: str, err: Exception, safetensors_only: bool = False) -> OSError:
    """An OSError that names the path (and offline mode) for a failed ``from_pretrained``."""
    hint = (
        " (HF_HUB_OFFLINE=1: only local paths and cached hub ids work)"
        if os.environ.get("HF_HUB_OFFLINE") == "1"
        else ""
    )
    if safetensors_only:
        hint += " (frozen models load from safetensors weights only: save_pretrained writes them)"
    return OSError(f"could not load model from {path!r}{hint}: {err}")


@contextlib.contextmanager
def transformers_load_report_silenced() -> Iterator[None]:
    """transformers' report of missing/unexpected weights is replaced by :func:`load_pretrained`'s checks."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def load_pretrained(
    auto_class: Any,
    path: str,
    settings: LoadSettings,
    role: str,
    head: str,
    new_head_ok: bool = False,
    safetensors_only: bool = False,
    fix: str = "",
    **extra: Any,
) -> torch.nn.Module:
    """``auto_class.from_pretrained`` with a check that the checkpoint has what ``role`` needs.

    Every weight must come from the checkpoint, except a new ``head`` when ``new_head_ok``.

    Args:
        auto_class: e.g. ``AutoModelForCausalLM``.
        path: local directory or hub id.
        settings: how to load (dtype, attention, 4-bit, trust_remote_code).
        role: what the model is for, in errors (``models.actor_path``, ``reward model 'rm'``).
        head: the name of the output head the role needs (``lm_head``, ``score``).
        new_head_ok: a head missing from the checkpoint starts at random (said once, in plain words).
        safetensors_only: refuse pickled ``.bin`` weights (frozen models).
        fix: what to set instead, appended to the error about a missing head.

    Raises:
        ValueError: naming the role, the path, what the checkpoint is, and what to set instead.
    """
    check_model_path(path)
    kwargs = {**model_kwargs(settings), **extra}
    if safetensors_only:
        kwargs["use_safetensors"] = True
    try:
        with transformers_load_report_silenced():
            model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as err:
        raise load_error(path, err, safetensors_only) from err
    missing = list(info.get("missing_keys") or [])
    heads = [k for k in missing if _head_of(k) == head]
    others = [k for k in missing if _head_of(k) != head]
    kind = ", ".join(getattr(model.config, "architectures", None) or []) or type(model).__name__
    if others:
        raise ValueError(f"{role} {path!r} ({kind}) lacks weights the model needs: {others[:5]}")
    if heads and not new_head_ok:
        raise ValueError(f"{role} {path!r} is a {kind} without the {head!r} head this role needs{fix}")
    if heads:
        log.info("%s %r is a %s without a %r head: a new one starts at random", role, path, kind, head)
    return model


def _head_of(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else key


def load_tokenizer(
    path: str, padding_side: Literal["left", "right"] = "left", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets its EOS token as pad (with a warning)."""
    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise load_error(path, err) from err
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an EOS token; add a pad token")
        log.warning("tokenizer at %r has no pad token; using its EOS token %r as pad", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_lora(model: torch.nn.Module, lora: LoraSettings, task_type: str, modules_to_save: list[str] | None = None):
    """Wrap ``model`` in a peft LoRA adapter; afterwards only adapter (and saved head) weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant, through the name this transformers version keeps.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
    warns on the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare(model: torch.nn.Module, settings: LoadSettings, task_type: str, modules_to_save: list[str] | None = None):
    """Apply k-bit preparation, gradient checkpointing and LoRA to a freshly loaded model."""
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if settings.lora.enabled:
        model = apply_lora(model, settings.lora, task_type, modules_to_save)
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` with padding positions set to 0, so left padding never shifts positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of the network to 0 (LoRA's own dropout is the user's choice and stays).

    With dropout on, the first PPO mini-batch would not reproduce the rollout's log-probs and the
    new/old ratio would start away from 1.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if key.endswith("dropout") and isinstance(value, float):
                setattr(config, key, 0.0)
