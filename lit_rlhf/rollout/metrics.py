"""A rollout's statistics: reward, KL, length, EOS rate, and the sampler-trainer mismatch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_rlhf import functional as F
from lit_rlhf.rollout.advantages import AllReduce, no_reduce
from lit_rlhf.rollout.experience import Experience


def ends_with_eos(sequences: Tensor, loss_mask: Tensor, eos_token_ids: Tensor) -> Tensor:
    """``[B]`` bool: the response's last valid token is an EOS (it was not cut at max_new_tokens)."""
    last = F.last_valid_index(loss_mask).clamp_min(0)  # the final sampled token
    responses = sequences[:, -loss_mask.shape[1] :]
    return torch.isin(responses.gather(1, last.unsqueeze(1)).squeeze(1), eos_token_ids)


def rollout_metrics(
    experience: Experience,
    reward_parts: dict[str, Tensor],
    eos_token_ids: Tensor,
    all_reduce: AllReduce = no_reduce,
    group_size: int = 1,
) -> dict[str, Tensor]:
    """Reward, KL, length and EOS statistics of a rollout, reduced over all ranks (one all-reduce).

    ``reward/mean`` and ``reward/std`` are of the trained-on scores (after shaping); ``reward/<key>``
    is the mean of each of ``reward_parts`` (``score``, the sum before shaping, and each component).
    A reference-free rollout (no ``ref_log_probs``) has no ``rollout/kl``. With several samples per
    prompt (``group_size`` contiguous rows), ``reward/zero_std_fraction`` is the share of prompts whose
    samples all scored the same (within 1e-6): a group-baselined advantage gives them no signal.
    """
    mask = experience.loss_mask
    lengths = mask.sum(-1).float()
    has_eos = ends_with_eos(experience.sequences, mask, eos_token_ids)
    reference_free = experience.ref_log_probs is None
    ref_log_probs = experience.old_log_probs if reference_free else experience.ref_log_probs
    k1_kl = torch.where(mask, experience.old_log_probs - ref_log_probs, 0.0).sum(-1)
    scores = experience.scores
    rows = torch.stack([scores, scores.square(), k1_kl, lengths, has_eos.float(), *reward_parts.values()])
    grouped = group_size > 1 and len(scores) % group_size == 0  # whole groups of contiguous rows
    groups = scores.float().view(-1, group_size) if grouped else scores.new_zeros(0, 1)
    zero_std = (groups.amax(dim=1) - groups.amin(dim=1) <= 1e-6).to(rows.dtype)
    counts = rows.new_tensor([len(zero_std), len(experience)])  # from host ints: no device sync
    sums = all_reduce(torch.cat([rows.sum(-1), zero_std.sum().reshape(1), counts]))
    count = sums[-1]
    mean = sums[:-3] / count
    var = (sums[1] - count * mean[0].square()).clamp_min(0) / (count - 1).clamp_min(1)
    metrics = {
        "reward/mean": mean[0],
        "reward/std": var.sqrt(),
        "rollout/kl": mean[2],
        "rollout/response_length": mean[3],
        "rollout/eos_rate": mean[4],
    }
    metrics.update({f"reward/{key}": value for key, value in zip(reward_parts, mean[5:], strict=True)})
    if reference_free:
        del metrics["rollout/kl"]
    if group_size > 1:
        metrics["reward/zero_std_fraction"] = sums[-3] / sums[-2].clamp_min(1)
    return metrics


def mismatch_metrics(experience: Experience, all_reduce: AllReduce = no_reduce, reduce_max: AllReduce = no_reduce):
    """How far the sampler's log-probs are from the trainer's old ones (valid tokens of all ranks).

    ``rollout/logprob_abs_diff`` (mean, ``_max``) and the importance ratio ``exp(old - rollout)``
    (``rollout/importance_ratio`` mean, ``_max``): what ``algorithm.rollout_correction`` corrects; and
    ``rollout/token_mult_prob_error``, the mean of ``exp|old - rollout|`` (1 when they agree).
    """
    mask = experience.loss_mask
    diff = (experience.old_log_probs - experience.rollout_log_probs).float()
    ratio = torch.where(mask, diff.exp(), 0.0)
    absolute = torch.where(mask, diff.abs(), 0.0)
    multiplicative = torch.where(mask, absolute.exp(), 0.0)
    sums = all_reduce(torch.stack([absolute.sum(), ratio.sum(), multiplicative.sum(), mask.sum().float()]))
    maxima = reduce_max(torch.stack([absolute.max(), ratio.max()]))
    return {
        "rollout/logprob_abs_diff": sums[0] / sums[3],
        "rollout/logprob_abs_diff_max": maxima[0],
        "rollout/importance_ratio": sums[1] / sums[3],
        "rollout/importance_ratio_max": maxima[1],
        "rollout/token_mult_prob_error": sums[2] / sums[3],
    }


def staleness_metrics(
    experience: Experience,
    carry: dict[str, float],
    all_reduce: AllReduce = no_reduce,
    reduce_max: AllReduce = no_reduce,
) -> dict[str, Tensor]:
    """An asynchronous rollout's staleness (``rollout/staleness_mean``, ``_max``: versions between each
    trained token's sampler and the policy it trains, over all ranks) and its rows carried over to the next
    rollout and dropped (``rollout/carried_over_rows``, ``rollout/dropped_rows``: sums over ranks)."""
    mask = experience.loss_mask
    device = mask.device
    staleness = torch.where(mask, experience.rollout_id[:, None] - experience.versions, 0).float()
    counts = [carry["carried_over_rows"], carry["dropped_rows"]]
    sums = all_reduce(torch.stack([staleness.sum(), mask.sum().float(), *torch.tensor(counts, device=device)]))
    return {
        "rollout/staleness_mean": sums[0] / sums[1].clamp_min(1),
        "rollout/staleness_max": reduce_max(staleness.max()),
        "rollout/carried_over_rows": sums[2],
        "rollout/dropped_rows": sums[3],
    }


def turn_metrics(
    experience: Experience,
    trajectories: list,
    all_reduce: AllReduce = no_reduce,
    reduce_max: AllReduce = no_reduce,
    tool_names: Sequence[str] = (),
) -> dict[str, Tensor]:
    """``rollout/turns`` (mean, ``_max``), tool calls and errors per trajectory, the truncated share, the
    trainable and observation tokens per trajectory, template mismatches, and for each of ``tool_names``
    ``tools/<name>/calls``, ``/errors``, ``/seconds`` (sums over the rollout on all ranks; the same
    names on every rank and in every rollout, zeros included, so that every rank logs the same keys)."""
    exp = experience
    device = exp.sequences.device
    attended = exp.attention_mask[:, -exp.num_actions :].bool()
    rows = torch.tensor(
        [
            [
                t.trajectory.turns,
                sum(t.tool_calls.values()),
                sum(t.tool_errors.values()),
                float(t.truncated),
                float(t.template_mismatch is not None),
            ]
            for t in trajectories
        ],
        dtype=torch.float32,
        device=device,
    )
    trainable = exp.loss_mask.sum(-1).float()
    observation = (attended & ~exp.loss_mask.bool()).sum(-1).float()
    sums = all_reduce(
        torch.cat(
            [
                rows.sum(0),
                torch.stack(
                    [
                        trainable.sum(),
                        observation.sum(),
                        torch.tensor(len(exp.sequences), device=device, dtype=torch.float32),
                    ]
                ),
            ]
        )
    )
    count = sums[-1]
    metrics = {
        "rollout/turns": sums[0] / count,
        "rollout/turns_max": reduce_max(rows[:, 0].max()),
        "rollout/tool_calls": sums[1] / count,
        "rollout/tool_errors": sums[2] / count,
        "rollout/truncated": sums[3] / count,
        "rollout/template_mismatches": sums[4],
        "rollout/trainable_tokens": sums[5] / count,
        "rollout/observation_tokens": sums[6] / count,
    }
    if tool_names:  # one all-reduce for every tool's counts; every rank logs the same keys
        per_tool = torch.tensor(
            [
                [sum(t.tool_calls[name] for t in trajectories) for name in tool_names],
                [sum(t.tool_errors[name] for t in trajectories) for name in tool_names],
                [sum(t.tool_seconds[name] for t in trajectories) for name in tool_names],
            ],
            dtype=torch.float32,
            device=device,
        )
        per_tool = all_reduce(per_tool)
        for i, name in enumerate(tool_names):
            for j, what in enumerate(("calls", "errors", "seconds")):
                metrics[f"tools/{name}/{what}"] = per_tool[j, i]
    return metrics
