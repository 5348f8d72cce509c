"""Rollouts: the runner, Experience and ExperienceBuffer, the rollout callback, KL controllers, engines.

Imported lazily, so that the settings can name ``RolloutEngine`` without loading Lightning.
"""

from lit_rlhf.lazy import lazy_exports

_EXPORTS = {
    "AdaptiveKLController": "lit_rlhf.rollout.kl_control",
    "KLController": "lit_rlhf.rollout.kl_control",
    "Experience": "lit_rlhf.rollout.experience",
    "ExperienceBuffer": "lit_rlhf.rollout.experience",
    "RolloutCallback": "lit_rlhf.rollout.callback",
    "RolloutEngine": "lit_rlhf.rollout.engines.base",
    "GenerationRequest": "lit_rlhf.rollout.engines.base",
    "Sample": "lit_rlhf.rollout.engines.base",
    "NativeEngine": "lit_rlhf.rollout.engines.native",
    "VLLMEngine": "lit_rlhf.rollout.engines.vllm",
    "SeparateEngine": "lit_rlhf.rollout.engines.separate",
    "Environment": "lit_rlhf.rollout.multi_turn.environment",
    "Step": "lit_rlhf.rollout.multi_turn.environment",
    "ToolEnvironment": "lit_rlhf.rollout.multi_turn.environment",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = list(_EXPORTS)
