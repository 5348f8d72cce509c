"""lit_rlhf: PPO-based RLHF (and GRPO/RLOO) for Hugging Face language models on PyTorch Lightning."""

from lit_rlhf.lazy import lazy_exports

__version__ = "0.1.0"

# Lazy exports: `import lit_rlhf.functional` must not pull in Lightning or transformers.
_EXPORTS = {
    "PPOModule": "lit_rlhf.modules",
    "SFTModule": "lit_rlhf.modules",
    "RewardModelModule": "lit_rlhf.modules",
    "DPOModule": "lit_rlhf.modules",
    "DPOModelSettings": "lit_rlhf.settings",
    "DPOSettings": "lit_rlhf.settings",
    "SFTDataModule": "lit_rlhf.data",
    "PreferenceDataModule": "lit_rlhf.data",
    "PromptDataModule": "lit_rlhf.data",
    "RolloutCallback": "lit_rlhf.rollout",
    "SampleLoggingCallback": "lit_rlhf.modules.sample_logging",
    "Experience": "lit_rlhf.rollout",
    "ExperienceBuffer": "lit_rlhf.rollout",
    "RolloutEngine": "lit_rlhf.rollout",
    "NativeEngine": "lit_rlhf.rollout",
    "VLLMEngine": "lit_rlhf.rollout",
    "RewardComponent": "lit_rlhf.rewards",
    "RewardFunction": "lit_rlhf.rewards",
    "RewardModel": "lit_rlhf.rewards",
    "RemoteReward": "lit_rlhf.rewards",
    "PPOModelSettings": "lit_rlhf.settings",
    "ModelSettings": "lit_rlhf.settings",
    "LoraSettings": "lit_rlhf.settings",
    "GenerationSettings": "lit_rlhf.settings",
    "RolloutSettings": "lit_rlhf.settings",
    "AlgorithmSettings": "lit_rlhf.settings",
    "KLSettings": "lit_rlhf.settings",
    "OptimizerSettings": "lit_rlhf.settings",
    "PPOOptimSettings": "lit_rlhf.settings",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [*_EXPORTS, "__version__"]
