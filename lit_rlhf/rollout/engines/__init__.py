"""Rollout engines: the token-level contract (``base``), the actor's own sampler and vLLM.

Imported lazily: the settings name ``RolloutEngine`` without loading transformers or vLLM.
"""

import importlib

_EXPORTS = {
    "RolloutEngine": "lit_rlhf.rollout.engines.base",
    "GenerationRequest": "lit_rlhf.rollout.engines.base",
    "Sample": "lit_rlhf.rollout.engines.base",
    "NativeEngine": "lit_rlhf.rollout.engines.native",
    "VLLMEngine": "lit_rlhf.rollout.engines.vllm",
    "pack_samples": "lit_rlhf.rollout.engines.packing",
    "requests_from_prompts": "lit_rlhf.rollout.engines.packing",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lit_rlhf.rollout.engines' has no attribute {name!r}")


__all__ = list(_EXPORTS)
