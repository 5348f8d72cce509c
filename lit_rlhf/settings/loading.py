"""The model groups: which checkpoints load, and how (dtype, attention, LoRA, 4-bit, checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lit_rlhf.plain_data import as_group
from lit_rlhf.settings.common import AttnImplementation, DType, _check, _check_path, _choice


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """LoRA adapters (peft) on the trained models; ``rank: 0`` trains all weights."""

    rank: int = 0
    """LoRA rank (0 = no adapter, full fine-tuning)."""
    alpha: int = 16
    """LoRA alpha (the adapter's scale is alpha / rank)."""
    dropout: float = 0.0
    """dropout on the adapter's input (the base model's own dropout is always off)."""
    target_modules: list[str] | str = "all-linear"
    """modules that get adapters: ``all-linear`` or a list of module names."""

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "lora", "rank", self.rank, ">= 0")
        _check(self.alpha > 0, "lora", "alpha", self.alpha, "> 0")
        _check(0.0 <= self.dropout < 1.0, "lora", "dropout", self.dropout, "in [0, 1)")
        _check(bool(self.target_modules), "lora", "target_modules", self.target_modules, "non-empty")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """How models are loaded: precision, attention kernel, adapters and memory savers."""

    dtype: DType = "float32"
    """weights dtype of every model (mixed precision comes from ``trainer.precision``)."""
    attn_implementation: AttnImplementation = "sdpa"
    """``sdpa``, ``eager`` or ``flash_attention_2`` (gpu extra)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on the trained models."""
    load_in_4bit: bool = False
    """load base weights in 4-bit NF4 (gpu extra; trains through LoRA, so needs ``lora.rank > 0``)."""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, about 30 % more compute)."""
    trust_remote_code: bool = False
    """run the model repository's own Python code (transformers' trust_remote_code); off unless you trust it."""
    padding_free: bool = False
    """pack the rows of every scoring and training forward into one row without padding
    (position ids restart per row), so no layer computes padding: attention stays within each row
    (``flash_attention_2``: varlen kernels; ``sdpa``: one causal call per run of equal-length rows).
    Pays off when response lengths vary (W2 on CPU: up to a fifth less training time). With ``eager``
    attention runs over the packed length with a block-diagonal mask, so leave it off there.
    Columns that are padding in every row are skipped either way."""

    def __post_init__(self) -> None:
        _choice(self.dtype, ("float32", "bfloat16", "float16"), "models", "dtype")
        _choice(self.attn_implementation, ("sdpa", "eager", "flash_attention_2"), "models", "attn_implementation")
        object.__setattr__(self, "lora", as_group(LoraSettings, self.lora))
        if self.load_in_4bit and not self.lora.enabled:
            raise ValueError("models.load_in_4bit=True trains through a LoRA adapter; set models.lora.rank > 0")

    def frozen(self) -> LoadSettings:
        """The settings for a frozen model (reference, reward): no adapter, no checkpointing."""
        return LoadSettings(
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            load_in_4bit=self.load_in_4bit,
            trust_remote_code=self.trust_remote_code,
            padding_free=self.padding_free,
        )


@dataclass(frozen=True, kw_only=True)
class PPOModelSettings(LoadSettings):
    """PPO's models (local directories or hub ids) and how they are loaded."""

    actor_path: str
    """the policy to train (an SFT checkpoint)."""
    critic_path: str | None = None
    """critic initialisation; default: the first ``RewardModel`` reward's path, else ``actor_path``."""
    reference_path: str | None = None
    """reference policy; default ``actor_path`` (with LoRA: the actor with its adapter disabled)."""
    new_value_head: bool | None = None
    """may the critic start with a new value head at random? None (default): only when it starts
    from the actor (no ``critic_path`` and no ``RewardModel`` reward); true: from any checkpoint
    without one (e.g. an SFT policy as ``critic_path``); false: never (a missing head is an error)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_path(self.actor_path, "models", "actor_path", required=True)
        _check_path(self.critic_path, "models", "critic_path", required=False)
        _check_path(self.reference_path, "models", "reference_path", required=False)


@dataclass(frozen=True, kw_only=True)
class ModelSettings(LoadSettings):
    """The model a single-model stage trains (SFT, reward model) and how it is loaded."""

    path: str
    """the model to train: local directory or hub id."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_path(self.path, "models", "path", required=True)


@dataclass(frozen=True, kw_only=True)
class DPOModelSettings(ModelSettings):
    """The policy DPO trains, its reference, and how they are loaded."""

    reference_path: str | None = None
    """the frozen reference policy; default ``path`` (with LoRA: the policy with its adapter disabled,
    no second copy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference_path is not None and (not isinstance(self.reference_path, str) or not self.reference_path):
            raise ValueError(f"models.reference_path must be a model directory or hub id, got {self.reference_path!r}")
