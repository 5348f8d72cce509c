"""The policy: a causal LM that samples responses and scores its own actions."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, StaticCache

from lit_rlhf.functional import entropy_from_logits, log_probs_from_hidden, log_probs_from_logits
from lit_rlhf.models.decoding import (
    RESPONSE_ROOM,
    CachedPrefix,
    grow,
    row_cache,
    runs_shared_prefix,
    sample_tokens,
    select_rows,
    takes_decode_mask,
)
from lit_rlhf.models.loading import (
    check_model_path,
    disable_dropout,
    load_pretrained,
    position_ids_from_mask,
    prepare,
)
from lit_rlhf.models.output_layer import chunked_head, hidden_states_out
from lit_rlhf.models.padding import (
    after_cache,
    pack_rows,
    packed_forward,
    shared_prefix_cache,
    split_shared_prefix,
    unpack,
    valid_window,
)
from lit_rlhf.models.stop_strings import StopStrings
from lit_rlhf.settings import GenerationSettings, LoadSettings


class GenerationOutput(NamedTuple):
    """One batch of sampled responses as tensors (``lit_rlhf.rollout.engines.pack_samples`` builds it
    from an engine's samples; the native sampler returns it directly).

    sequences: ``[B, P+A]`` left-padded prompt followed by the right-padded response.
    attention_mask: ``[B, P+A]`` 1 for prompt tokens and for every response token (what is attended to).
    loss_mask: ``[B, A]`` bool, True exactly on the response tokens the policy sampled in this
        rollout (the tokens trained on). In a single-turn response it equals the response part of
        ``attention_mask``; a multi-turn one also attends to tool output it did not sample.
    log_probs: ``[B, A]`` fp32 log-probs of the sampled tokens at the sampling temperature
        (before top-k/top-p filtering), as seen while decoding; 0 where ``loss_mask`` is False.
    finished: ``[B]`` bool, the row ended by itself (an EOS, a stop token, or a token that completed
        one of ``generation.stop_strings``) rather than at ``max_new_tokens``.
    """

    sequences: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    log_probs: Tensor
    finished: Tensor

    @property
    def num_actions(self) -> int:
        return self.loss_mask.shape[1]


def response_texts(tokenizer: PreTrainedTokenizerBase, sequences: Tensor, attention_mask: Tensor, num_actions: int):
    """Each row's response text: all ``num_actions`` last tokens the row attends to, trained on or not
    (a tool's output too), special tokens skipped."""
    responses = sequences[:, -num_actions:].masked_fill(attention_mask[:, -num_actions:] == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


class ActionLogits(NamedTuple):
    log_probs: Tensor
    entropy: Tensor


class Actor(nn.Module):
    """A causal LM policy (optionally with a LoRA adapter).

    Args:
        model: a ``*ForCausalLM`` model, or a peft model wrapping one.
        eos_token_ids: token ids that end a response.
        pad_token_id: id written after a row's EOS.
        padding_free: pack the rows of every scoring/training forward into one row without padding
            (worth it with ``flash_attention_2``; see ``lit_rlhf.models.padding``).
        tokenizer: decodes sampled responses for ``generation.stop_strings`` (``from_pretrained`` sets it).
    """

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: list[int],
        pad_token_id: int,
        padding_free: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.padding_free = padding_free
        self.register_buffer("eos_token_ids", torch.tensor(eos_token_ids, dtype=torch.long), persistent=False)
        self.pad_token_id = pad_token_id
        self.chunked_logits = True  # see chunked_head

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        tokenizer: PreTrainedTokenizerBase,
        settings: LoadSettings = LoadSettings(),
        role: str = "policy",
        frozen: bool = False,
    ) -> Actor:
        """Load a causal LM from a local directory or hub id (a saved LoRA adapter directory works too).

        ``role`` names the model in errors (a checkpoint without a language-model head is one);
        ``frozen`` models load from safetensors weights only.
        """
        check_model_path(path)
        adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))
        if adapter:
            model = _load_adapter(path, settings, role)
        else:
            fix = ": it must be a causal LM (*ForCausalLM), e.g. your SFT policy"
            model = load_pretrained(
                AutoModelForCausalLM, path, settings, role, "lm_head", safetensors_only=frozen, fix=fix
            )
        if not adapter:
            model = prepare(model, settings, task_type="CAUSAL_LM")
        disable_dropout(model)
        eos = tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        return cls(model, eos_ids, tokenizer.pad_token_id, padding_free=settings.padding_free, tokenizer=tokenizer)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the base model without the LoRA adapter (the reference policy, no second copy)."""
        if not self.has_adapter:
            raise RuntimeError("adapter_disabled() needs an actor loaded with LoRA (lora rank > 0)")
        with self.model.disable_adapter():
            yield

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        settings: GenerationSettings,
        generator: torch.Generator | None = None,
        on_token: Callable[[int, int], bool | None] | None = None,
        compact: bool = True,
        stop_token_ids: Tensor | None = None,
        prefix: CachedPrefix | None = None,
        kept: list | None = None,
    ) -> GenerationOutput:
        """Sample responses for left-padded prompts ``input_ids [B, P]`` with a KV cache.

        A row ends at its first EOS, at a token of its row of ``stop_token_ids`` (``[B, K]``, -1 pads;
        None: ``settings.stop_token_ids`` for every row) or at a token completing a stop string; that
        token is its last. Each row's response is exactly the tokens sampled for it, so
        ``loss_mask`` is the sampled prefix of each row (never read back from token values).

        Finished rows stop costing decoding work: once a quarter of the rows still decoding have
        produced an EOS, they are dropped from the batch and from the KV cache (``compact``; only
        when decoding stops at EOS). Sampling draws one uniform number per row and step for the
        whole batch, so compaction never changes a row's tokens (see :func:`sample_tokens`).
        ``generator`` (on the model's device) makes sampling independent of the global RNG;
        ``on_token(done, total)`` is told after each decoding step (a progress display); when it returns
        True, decoding stops there, and every row still decoding ends with the tokens it has (``length``).

        ``prefix`` (models for which :func:`reuses_cache` holds): keys and values already computed for
        each row's first tokens; ``input_ids`` are then the rest of each row, and only they are
        prefilled. ``kept`` (a list): filled with each row's keys and values (``[L, H, n, D]`` each,
        in batch order) for its cached and prompt tokens and all but the last of its sampled ones,
        i.e. what a later generation that continues the row can take as its prefix.
        """
        # in the weights' dtype even under mixed precision (validation runs inside autocast): the
        # static cache holds one dtype, while autocast gives bf16 values and (after rotary) fp32 keys
        with torch.autocast(input_ids.device.type, enabled=False):
            return self._generate(
                input_ids, attention_mask, settings, generator, on_token, compact, stop_token_ids, prefix, kept
            )

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Keys and values ``[1, H, n, D]`` per layer of one row of tokens at positions ``0 .. n - 1``
        (a prompt prefix that many rows share, computed once)."""
        from transformers import DynamicCache

        with torch.autocast(self.eos_token_ids.device.type, enabled=False):
            cache = DynamicCache(config=self.model.config)
            ids_tensor = torch.tensor([ids], device=self.eos_token_ids.device)
            self.model(input_ids=ids_tensor, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]

    def _generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        settings: GenerationSettings,
        generator: torch.Generator | None,
        on_token: Callable[[int, int], bool | None] | None,
        compact: bool,
        stop_token_ids: Tensor | None,
        prefix: CachedPrefix | None,
        kept: list | None,
    ) -> GenerationOutput:
        eos_ids, (batch, suffix_len), device = self.eos_token_ids, input_ids.shape, input_ids.device
        cached = 0 if prefix is None else prefix.mask.shape[1]
        prompt_len = cached + suffix_len  # cache positions before the response
        prompt_mask = attention_mask.long()
        if prefix is not None:
            prompt_mask = torch.cat([prefix.mask.long(), prompt_mask], 1)
        if stop_token_ids is None and settings.stop_token_ids:
            stop_token_ids = torch.tensor([list(settings.stop_token_ids)] * batch, device=device)
        if stop_token_ids is not None:  # EOS ends every row; these end their own row
            stop_token_ids = torch.cat([eos_ids.expand(batch, -1), stop_token_ids.to(device)], dim=1)
        max_new = settings.max_new_tokens
        # a pre-allocated cache, written in place; it starts with room for a short response and
        # doubles when full, so attention never runs over a mostly empty cache
        room = min(max_new, RESPONSE_ROOM)
        cache = StaticCache(config=self.model.config, max_cache_len=prompt_len + room)
        if prefix is not None:
            for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
                cache.update(keys, values, layer)
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new)], dim=1)
        positions = position_ids_from_mask(prompt_mask)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=mask[:, :prompt_len],
            position_ids=positions[:, cached:],
            past_key_values=cache,
            cache_position=torch.arange(cached, prompt_len, device=device),
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if not bool(torch.isfinite(logits).all()):  # one check per rollout, before anything is sampled
            raise FloatingPointError(
                "the policy's next-token logits are not finite before sampling: its weights are not finite "
                "(did training diverge? resume from an earlier checkpoint with a lower learning rate)"
            )
        responses = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=device)
        log_probs = torch.zeros(batch, max_new, device=device)
        active = torch.arange(batch, device=device)  # the rows still decoding, as indices into the batch
        next_position = positions[:, -1:] + 1
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        stops = StopStrings(self.tokenizer, settings.stop_strings) if settings.stop_strings else None
        lengths = torch.full((batch,), max_new, device=device)  # tokens sampled per row (its end, once ended)
        ended_by_itself = torch.zeros(batch, dtype=torch.bool, device=device)
        early = settings.stop_at_eos or stops is not None or stop_token_ids is not None  # rows can end early
        key_mask = None  # the keys each row may attend to, as the model's 4D mask (see takes_decode_mask)
        if takes_decode_mask(self.model.config):
            key_mask = torch.zeros(batch, 1, 1, prompt_len + max_new, dtype=torch.bool, device=device)
            key_mask[:, 0, 0, :prompt_len] = prompt_mask.bool()
        kept_rows: dict[int, tuple[Tensor, Tensor]] = {}

        def keep(rows: Tensor) -> None:  # rows (indices into the cache's batch) about to leave it
            if kept is None:
                return
            for row, sampled in zip(rows.tolist(), lengths[active[rows]].clamp_max(step + 1).tolist(), strict=True):
                response = prompt_len + torch.arange(sampled - 1, device=device)
                held = torch.cat([prompt_mask[active[row]].nonzero().squeeze(1), response])
                kept_rows[int(active[row])] = row_cache(cache, row, held)

        steps = max_new
        for step in range(max_new):
            uniform = torch.rand(batch, generator=generator, device=device)[active]  # the whole batch's draw
            token = torch.where(finished, self.pad_token_id, sample_tokens(logits, settings, uniform))
            responses[active, step] = token
            log_probs[active, step] = log_probs_from_logits(logits, token, settings.scoring_temperature)
            if stop_token_ids is None:
                ends = torch.isin(token, eos_ids)
            else:
                ends = (token.unsqueeze(1) == stop_token_ids[active]).any(1)
            if stops is not None:  # the same rule as the vLLM engine's (see lit_rlhf.models.stop_strings)
                ends = ends | stops.completed(responses[active, max(0, step + 1 - stops.window) : step + 1])
            ends = ends & ~finished
            lengths[active[ends]] = step + 1
            ended_by_itself[active[ends]] = True
            finished = finished | ends
            stop = on_token is not None and bool(on_token(step + 1, max_new))
            done = int(finished.sum()) if early else 0  # one host sync per step
            if stop or step == max_new - 1 or (early and done == len(active)):
                steps = step + 1
                keep(torch.arange(len(active), device=device))
                break
            if compact and done and done >= len(active) / 4:
                keep(finished.nonzero().squeeze(1))
                going = (~finished).nonzero().squeeze(1)
                select_rows(cache, going)
                active, mask, next_position = active[going], mask[going], next_position[going]
                finished, token = finished[going], token[going]
                key_mask = key_mask[going] if key_mask is not None else None
            length = prompt_len + step + 1
            if length == prompt_len + room:
                room = min(max_new, 2 * room)
                grow(cache, prompt_len + room)
            if key_mask is not None:
                key_mask[:, 0, 0, length - 1] = True
            logits = self.model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask[:, :length] if key_mask is None else key_mask[..., : prompt_len + room],
                position_ids=next_position,
                past_key_values=cache,
                cache_position=torch.tensor([length - 1], device=device),
                use_cache=True,
            ).logits[:, -1]
            next_position = next_position + 1
        responses = responses[:, :steps]
        if kept is not None:
            kept.extend(kept_rows[row] for row in range(batch))
        loss_mask = torch.arange(steps, device=device) < lengths.clamp_max(steps)[:, None]
        return GenerationOutput(
            sequences=torch.cat([input_ids, responses], dim=1),
            attention_mask=torch.cat([attention_mask.long(), loss_mask.long()], dim=1),
            loss_mask=loss_mask,
            log_probs=torch.where(loss_mask, log_probs[:, :steps], 0.0),
            finished=ended_by_itself,
        )

    def action_logits(self, sequences: Tensor, attention_mask: Tensor, num_actions: int) -> Tensor:
        """Logits ``[B, A, V]`` that predicted each of the last ``num_actions`` tokens.

        Padding is skipped (``lit_rlhf.models.padding``): columns that are padding in every row are
        never computed, and with ``padding_free`` the rows are packed into one. Logits at positions
        that predict padding are zeros then; they are masked out by every loss.

        Tokens that every row starts with (a system prompt, the tools' schemas, one prompt's group of
        samples; at least ``padding.SHARED_PREFIX_MIN``) run once where :func:`runs_shared_prefix`
        holds: their keys and values come from one forward of one row that every row attends to, and
        the gradients of all rows flow back into it, so the result is the full forward's (within
        float tolerance). With ``padding_free`` this is chosen only when it runs fewer tokens than
        packing would.
        """
        split = None
        if runs_shared_prefix(self.model):
            split = split_shared_prefix(sequences, attention_mask, num_actions, packing=self.padding_free)
        if self.padding_free and split is None:
            packed = pack_rows(sequences, attention_mask)
            predictors = packed.index[:, -num_actions - 1 : -1]  # the token before each action
            logits = packed_forward(
                self.model,
                packed,
                attention_mask.sum(-1),
                logits_to_keep=predictors[predictors >= 0],
                use_cache=False,
            ).logits[0]
            return unpack(logits, predictors)
        past, offset = None, 0
        if split is not None:
            past, offset = shared_prefix_cache(self.model, split, sequences, logits_to_keep=1), split.length
            sequences, attention_mask = split.sequences, split.attention_mask
        start, end = valid_window(attention_mask, num_actions)
        kept = num_actions - (sequences.shape[1] - end)
        mask = attention_mask[:, start:end]
        out = self.model(
            input_ids=sequences[:, start:end],
            attention_mask=after_cache(mask, offset),
            position_ids=offset + position_ids_from_mask(mask),
            past_key_values=past,
            logits_to_keep=kept + 1,
            use_cache=past is not None,
        )
        return torch.nn.functional.pad(out.logits[:, :-1], (0, 0, 0, num_actions - kept))

    def forward(self, sequences: Tensor, attention_mask: Tensor, num_actions: int, temperature: float = 1.0) -> Tensor:
        """Log-probs ``[B, A]`` (fp32) of the last ``num_actions`` tokens of ``sequences``."""
        return self._log_probs(sequences, attention_mask, num_actions, temperature, False, False).log_probs

    def log_probs_and_entropy(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        num_actions: int,
        temperature: float = 1.0,
        entropy_grad: bool = True,
    ) -> ActionLogits:
        """Action log-probs and per-token entropy ``[B, A]`` from one forward pass.

        ``entropy_grad=False`` computes the entropy outside the autograd graph (for logging only),
        so the backward pass skips a softmax over the vocabulary.
        """
        return self._log_probs(sequences, attention_mask, num_actions, temperature, True, entropy_grad)

    def _log_probs(
        self,
        sequences: Tensor,
        attention_mask: Tensor,
        num_actions: int,
        temperature: float,
        entropy: bool,
        entropy_grad: bool,
    ) -> ActionLogits:
        """The action tokens' log-probs (and entropy). With a plain output layer (:meth:`chunked_head`) the
        model returns the hidden states of the action positions only and the output layer runs a chunk
        of tokens at a time (``log_probs_from_hidden``): ``[B, A, V]`` fp32 logits never exist."""
        labels = sequences[:, -num_actions:]
        head = self.chunked_head()
        if head is not None:
            with hidden_states_out(head):
                hidden = self.action_logits(sequences, attention_mask, num_actions)
            log_probs, ent = log_probs_from_hidden(
                hidden, head.weight, head.bias, labels, temperature, entropy, entropy_grad
            )
            return ActionLogits(log_probs, ent)
        logits = self.action_logits(sequences, attention_mask, num_actions)
        ent = None
        if entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
        return ActionLogits(log_probs_from_logits(logits, labels, temperature), ent)

    def chunked_head(self) -> nn.Linear | None:
        """The output layer, where log-probs may come from hidden states in chunks
        (``lit_rlhf.models.output_layer.chunked_head``) and ``chunked_logits`` is on; else None (the full
        logits, upcast a row at a time)."""
        return chunked_head(self.model) if self.chunked_logits else None

    def save_pretrained(
        self, path: str, merge_lora: bool = True, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        """Write a Hugging Face checkpoint (LoRA merged into the weights unless ``merge_lora=False``)."""
        model = self.model
        if self.has_adapter and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _load_adapter(path: str, settings: LoadSettings, role: str) -> nn.Module:
    from peft import PeftModel

    with open(os.path.join(path, "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    base = load_pretrained(AutoModelForCausalLM, base_path, settings, f"{role} (the adapter's base)", "lm_head")
    return PeftModel.from_pretrained(base, path, is_trainable=True)
