"""Loading Hugging Face models and tokenizers: paths, dtype, attention, LoRA, 4-bit, pad token.

flash-attn and bitsandbytes are optional (`pip install 'lit_rlhf[gpu]'`); they are looked up only
when a feature that needs them is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_rlhf.settings import DType, LoadSettings, LoraSettings

log = logging.getLogger(__name__)

GPU_EXTRA_HINT = "install the GPU extra: pip install 'lit_rlhf[gpu]'"


def model_kwargs(settings: LoadSettings) -> dict:
    """Keyword arguments for ``from_pretrained`` (validated: missing extras raise here)."""
    kwargs: dict = {"dtype": getattr(torch, settings.dtype), "attn_implementation": settings.attn_implementation}
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


def load_error(path: str, err: Exception) -> OSError:
    """An OSError that names the path (and offline mode) for a failed ``from_pretrained``."""
    hint = (
        " (HF_HUB_OFFLINE=1: only local paths and cached hub ids work)"
        if os.environ.get("HF_HUB_OFFLINE") == "1"
        else ""
    )
    return OSError(f"could not load model from {path!r}{hint}: {err}")


def load_tokenizer(path: str, padding_side: Literal["left", "right"] = "left") -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets its EOS token as pad (with a warning)."""
    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
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


def prepare(model: torch.nn.Module, settings: LoadSettings, task_type: str, modules_to_save: list[str] | None = None):
    """Apply k-bit preparation, gradient checkpointing and LoRA to a freshly loaded model."""
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
