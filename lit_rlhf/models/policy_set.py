"""PolicySet: the policy-side models PPO and DPO both own, built, checked, sharded and exported one way."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_rlhf.models.actor import Actor, GenerationOutput, response_texts
from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.models.sharding import fsdp2_setup, full_state_dict, is_sharded, shard_model
from lit_rlhf.models.value import ValueModel
from lit_rlhf.settings import LoadSettings

REFERENCE_PREFIX = "reference."  # the frozen reference's keys in a module's state dict


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a frozen model is never trained and never in an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class CriticSpec:
    """Where a critic starts: ``path`` (named ``role`` in errors), whether a new value head may be
    made there, and the fix an error about its head or tokenizer suggests."""

    path: str
    role: str = "the critic"
    new_head_ok: bool = False
    fix: str = ""


class PolicySet:
    """The actor, its reference and an optional critic: what a policy-optimising module owns.

    The reference is a frozen copy of ``reference_path`` (default the actor's path), or, with LoRA
    and no ``reference_path``, the actor with its adapter disabled (no second copy); a run with no
    reference term (``uses_reference`` False: PPO's ``kl.coef: 0``, SimPO) builds none. The models
    stay the owning module's submodules (``actor``, ``reference``, ``critic``), so strategies move
    and shard them and checkpoints keep their keys.

    Args:
        actor, reference, critic: the loaded models.
        load: how they were loaded (a sharded one is rebuilt from its path for export).
        tokenizer: the actor's.
        actor_path, critic_path: where the actor and the critic were loaded from.
        uses_reference: whether the run has a reference term at all.
    """

    def __init__(
        self,
        actor: Actor,
        reference: Actor | None,
        critic: ValueModel | None,
        load: LoadSettings,
        tokenizer: PreTrainedTokenizerBase,
        actor_path: str,
        critic_path: str | None = None,
        uses_reference: bool = True,
    ) -> None:
        self.actor, self.reference, self.critic = actor, reference, critic
        self.load, self.tokenizer = load, tokenizer
        self.actor_path, self.critic_path, self.uses_reference = actor_path, critic_path, uses_reference

    @classmethod
    def build(
        cls,
        load: LoadSettings,
        tokenizer: PreTrainedTokenizerBase,
        actor_path: str,
        *,
        actor_role: str,
        reference_path: str | None = None,
        uses_reference: bool = True,
        critic: CriticSpec | None = None,
    ) -> PolicySet:
        """Load the actor (trainable), the frozen reference and the critic (trainable); check their heads."""
        actor = Actor.from_pretrained(actor_path, tokenizer, load, role=actor_role)
        reference = None
        if uses_reference and (reference_path is not None or not load.lora.enabled):
            path, role = reference_path, "models.reference_path"
            if path is None:
                path, role = actor_path, f"the reference ({actor_role})"
            reference = freeze(Actor.from_pretrained(path, tokenizer, load.frozen(), role=role, frozen=True))
        value = None
        if critic is not None:
            value = ValueModel.from_pretrained(critic.path, load, critic.role, critic.new_head_ok, fix=critic.fix)
        return cls(
            actor, reference, value, load, tokenizer, actor_path, critic.path if critic else None, uses_reference
        )

    @staticmethod
    def check_tokenizers(
        tokenizer: PreTrainedTokenizerBase, others: dict[str, tuple[str | None, str]], trust_remote_code: bool = False
    ) -> None:
        """Every other model reads the actor's token ids: its tokenizer must be the actor's.

        ``others`` maps a role to ``(path, fix)``; a None path is skipped. Reads tokenizers only (before
        any model loads).
        """
        for role, (path, fix) in others.items():
            if path is None:
                continue
            other = load_tokenizer(path, trust_remote_code=trust_remote_code)
            if other.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"{role} would start from {path!r}, whose tokenizer differs from the actor's ({len(other)} vs "
                    f"{len(tokenizer)} tokens), so it would read the actor's token ids as another vocabulary{fix}"
                )

    # --- the reference ----------------------------------------------------------------------------

    @property
    def has_reference(self) -> bool:
        """A reference term exists: a frozen reference, or the LoRA actor with its adapter disabled."""
        return self.uses_reference and (self.reference is not None or self.actor.has_adapter)

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[Actor]:
        """The reference policy to run: the frozen reference, or the actor with its adapter disabled."""
        if self.reference is not None:
            yield self.reference
            return
        with self.actor.adapter_disabled():
            yield self.actor

    def reference_log_probs(
        self, sequences: Tensor, attention_mask: Tensor, num_actions: int, temperature: float
    ) -> Tensor:
        """Reference-policy log-probs ``[B, A]`` of the last ``num_actions`` tokens."""
        with self.reference_policy() as reference:
            return reference(sequences, attention_mask, num_actions, temperature)

    # --- the rest ---------------------------------------------------------------------------------

    def decode(self, gen: GenerationOutput) -> list[str]:
        """Response texts: every response token the rows attend to (special tokens dropped)."""
        return response_texts(self.tokenizer, gen.sequences, gen.attention_mask, gen.num_actions)

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen models: left out of checkpoints and reloaded from their paths."""
        return (REFERENCE_PREFIX,)

    def shard(self, mesh: Any, precision: str | None, scored: tuple[ValueModel, ...] = ()) -> None:
        """FSDP2 over the data-parallel mesh, per decoder layer: the actor, the reference, the critic and
        any other ``scored`` value models (reward models)."""
        data_parallel, policy = fsdp2_setup(mesh, precision)
        for wrapper in (self.actor, self.reference):
            if wrapper is not None:
                shard_model(wrapper.model, data_parallel, policy)
        for wrapper in (self.critic, *scored):
            if wrapper is not None:
                shard_model(wrapper.model, data_parallel, policy, separate_backbone=True)

    def write(self, folders: dict[str, str], writer: bool, merge_lora: bool = True) -> None:
        """Write ``actor``/``critic`` (keys of ``folders``) as Hugging Face checkpoints with the tokenizer.

        Under FSDP2 every rank must call this (the full weights are gathered collectively); only a
        ``writer`` writes, a sharded model through a plain copy rebuilt from its path.
        """
        for name, folder in folders.items():
            wrapper = self.actor if name == "actor" else self.critic
            state = full_state_dict(wrapper.model)  # collective under FSDP2: every rank takes part
            if not writer:
                continue
            if is_sharded(wrapper.model):
                wrapper = self._unsharded_copy(name, wrapper, state)
            wrapper.save_pretrained(folder, merge_lora=merge_lora, tokenizer=self.tokenizer)

    def _unsharded_copy(self, name: str, sharded: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        if name == "actor":
            copy = Actor.from_pretrained(self.actor_path, self.tokenizer, self.load)
        else:
            copy = ValueModel.from_pretrained(self.critic_path, self.load, new_head_ok=True)  # weights loaded below
            copy.set_normalization(sharded.reward_mean.item(), sharded.reward_std.item())
        copy.model.load_state_dict(state)
        return copy


def drop_frozen(state: dict, prefixes: tuple[str, ...]) -> None:
    """Remove the frozen models' weights from a checkpoint's state dict (they are reloaded from their paths)."""
    for key in [k for k in state if k.startswith(prefixes)]:
        del state[key]


def restore_frozen(state: dict, current: dict, prefixes: tuple[str, ...]) -> None:
    """Put the freshly loaded frozen weights (``current``, the module's state dict) back into a checkpoint's."""
    for key, value in current.items():
        if key.startswith(prefixes):
            state.setdefault(key, value)
