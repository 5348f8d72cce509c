"""Rollouts: Experience, ExperienceBuffer, the rollout and sample-logging callbacks, KL controllers, engines."""

from lit_rlhf.rollout.callback import RolloutCallback
from lit_rlhf.rollout.experience import Experience, ExperienceBuffer
from lit_rlhf.rollout.kl_control import AdaptiveKLController, KLController
from lit_rlhf.rollout.samples import SampleLoggingCallback
from lit_rlhf.rollout.vllm_engine import VLLMEngine

__all__ = [
    "AdaptiveKLController",
    "Experience",
    "ExperienceBuffer",
    "KLController",
    "RolloutCallback",
    "SampleLoggingCallback",
    "VLLMEngine",
]
