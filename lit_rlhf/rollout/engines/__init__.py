"""Rollout engines: the token-level contract (``base``), the actor's own sampler and vLLM.

Imported lazily: the settings name ``RolloutEngine`` without loading transformers or vLLM.
"""

from lit_rlhf.lazy import lazy_exports

_EXPORTS = {
    "RolloutEngine": "lit_rlhf.rollout.engines.base",
    "GenerationRequest": "lit_rlhf.rollout.engines.base",
    "Sample": "lit_rlhf.rollout.engines.base",
    "NativeEngine": "lit_rlhf.rollout.engines.native",
    "VLLMEngine": "lit_rlhf.rollout.engines.vllm",
    "SeparateEngine": "lit_rlhf.rollout.engines.separate",
    "pack_samples": "lit_rlhf.rollout.engines.packing",
    "requests_from_prompts": "lit_rlhf.rollout.engines.packing",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
