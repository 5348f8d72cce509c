"""lit_rlhf: PPO-based RLHF (and GRPO/RLOO) for Hugging Face language models on PyTorch Lightning."""

__version__ = "0.1.0"
