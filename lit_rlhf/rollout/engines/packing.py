"""From an engine's samples to the tensors the scorer reads (one function for every engine)."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.models.actor import GenerationOutput
from lit_rlhf.rollout.engines.base import GenerationRequest, Sample


def requests_from_prompts(
    input_ids: Tensor, attention_mask: Tensor, seeds: list[int], stop_token_ids: tuple[int, ...] = ()
) -> list[GenerationRequest]:
    """One request per row of left-padded prompts ``input_ids [B, P]``: its unpadded ids and its seed."""
    lengths = attention_mask.sum(-1).tolist()
    rows = input_ids.tolist()
    return [
        GenerationRequest(tuple(ids[len(ids) - n :]), seed, tuple(stop_token_ids))
        for ids, n, seed in zip(rows, lengths, seeds, strict=True)
    ]


def pack_samples(
    input_ids: Tensor, attention_mask: Tensor, samples: list[Sample], pad_token_id: int
) -> GenerationOutput:
    """The samples behind their left-padded prompts ``input_ids [B, P]``, responses right-padded.

    The response part of ``attention_mask`` is 1 on every token of a sample; ``loss_mask`` is 1 exactly
    on the sampled ones (a sample's own ``loss_mask``, or all of its tokens); log-probs are 0 and token
    ids ``pad_token_id`` elsewhere; ``finished`` is ``finish_reason == "stop"``.
    """
    if len(samples) != input_ids.shape[0]:
        raise ValueError(f"{len(samples)} samples for {input_ids.shape[0]} prompts: an engine returns one per request")
    device = input_ids.device
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.long)
    width = max(1, int(lengths.max()) if len(samples) else 1)
    responses = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    log_probs = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        if sample.token_ids:
            responses[row, : len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            log_probs[row, : len(sample.log_probs)] = torch.tensor(sample.log_probs, dtype=torch.float32)
    attended = torch.arange(width)[None, :] < lengths[:, None]
    loss_mask = attended.clone()
    for row, sample in enumerate(samples):
        if sample.loss_mask is not None and sample.token_ids:
            loss_mask[row, : len(sample.loss_mask)] = torch.tensor(sample.loss_mask, dtype=torch.bool)
    loss_mask, attended = loss_mask.to(device), attended.to(device)
    return GenerationOutput(
        sequences=torch.cat([input_ids, responses.to(device)], dim=1),
        attention_mask=torch.cat([attention_mask.long(), attended.long()], dim=1),
        loss_mask=loss_mask,
        log_probs=log_probs.to(device),
        finished=torch.tensor([s.finish_reason == "stop" for s in samples], dtype=torch.bool, device=device),
    )


def left_padded(
    prompts: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as left-padded ``input_ids`` and ``attention_mask`` ``[B, P]``."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    return input_ids, attention_mask


def unpack_samples(gen: GenerationOutput) -> list[Sample]:
    """The samples of a packed batch whose responses are each a sampled prefix (the native sampler's)."""
    lengths = gen.loss_mask.sum(-1).tolist()
    tokens = gen.sequences[:, -gen.num_actions :].tolist()
    log_probs = gen.log_probs.tolist()
    finished = gen.finished.tolist()
    return [
        Sample(tuple(ids[:n]), tuple(lps[:n]), "stop" if done else "length")
        for ids, lps, n, done in zip(tokens, log_probs, lengths, finished, strict=True)
    ]
