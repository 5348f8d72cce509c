"""Rollouts: Experience, ExperienceBuffer, RolloutCallback, rewards and KL controllers."""

from lit_rlhf.rollout.callback import RolloutCallback
from lit_rlhf.rollout.experience import Experience, ExperienceBuffer
from lit_rlhf.rollout.kl_control import AdaptiveKLController, KLController

__all__ = ["AdaptiveKLController", "Experience", "ExperienceBuffer", "KLController", "RolloutCallback"]
