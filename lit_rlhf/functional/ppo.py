"""Pure tensor math of PPO-style RLHF: log-probs, masked statistics, KL, advantages, PPO losses.

Shapes: ``B`` batch, ``T`` (or ``A``) action positions, ``V`` vocabulary. Masks are 0/1 or bool,
``True``/1 meaning "this position counts" (for a response: the policy sampled this token in this
rollout). A mask may have holes (a multi-turn response holds tool output the policy did not
sample); every function here treats a row as the sequence of its masked-in positions. Masked-out
positions never leak into a result, even when they hold ``inf`` or ``nan``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
GroupMethod = Literal["grpo", "dr_grpo", "rloo"]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
GROUP_METHODS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")

# Bound on |log_probs - ref_log_probs| inside the k3 estimator: exp(20) ~ 5e8 is far past any
# useful KL and keeps exp() (and its gradient) finite in fp32 and bf16.
K3_LOG_RATIO_BOUND = 20.0


class GAEResult(NamedTuple):
    advantages: Tensor
    returns: Tensor


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, in fp32.

    Args:
        logits: ``[..., V]`` in any float dtype; never modified.
        labels: ``[...]`` token ids.
        temperature: sampling temperature the tokens were drawn with.

    Returns:
        ``[...]`` fp32 log-probs. Half-precision logits are upcast one row at a time, so a
        ``[B, T, V]`` bf16 tensor is never copied to fp32 whole.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float32, torch.float64):
        return _row_log_probs(logits, labels, temperature)
    rows = [_row_log_probs(row, row_labels, temperature) for row, row_labels in zip(logits, labels, strict=True)]
    return torch.stack(rows)


def _row_log_probs(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``[...]`` (fp32) of ``softmax(logits / temperature)`` for ``logits [..., V]``."""
    if logits.dtype in (torch.float32, torch.float64):
        return _row_entropy(logits, temperature)
    return torch.stack([_row_entropy(row, temperature) for row in logits])


def _row_entropy(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


# tokens per chunk of the output layer: at most this many logits exist at once (2**26 fp32 = 256 MiB),
# e.g. 441 tokens of a 151,936-token vocabulary
LOGIT_CHUNK_ELEMENTS = 2**26


def log_probs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = True,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` (and the entropy) under ``softmax((hidden @ weight.T + bias) / temperature)``,
    the output layer applied a chunk of tokens at a time: the logits of at most ``chunk_elements`` //
    V tokens exist at once, in fp32, forward and backward (each chunk's logits are recomputed in the
    backward pass instead of kept), so a 150k vocabulary never holds ``[B, A, V]`` fp32 logits
    (``chunk_elements`` None: ``LOGIT_CHUNK_ELEMENTS``).

    Args:
        hidden: ``[..., H]`` the last hidden states that predict ``labels``.
        weight, bias: the output layer's ``[V, H]`` weight and ``[V]`` bias (or None).
        labels: ``[...]`` token ids.
        entropy: also return the entropy; ``entropy_grad=False`` keeps it out of the autograd graph.

    Returns:
        ``([...] fp32 log-probs, [...] fp32 entropy or None)``; equal to the full logits' values.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = labels.shape
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    step = max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // weight.shape[0])
    grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    log_probs, entropies = [], []
    for start in range(0, flat.shape[0], step):
        args = (flat[start : start + step], weight, bias, flat_labels[start : start + step])
        if grad:
            picked, ent = torch.utils.checkpoint.checkpoint(
                _chunk_log_probs, *args, temperature, entropy, entropy_grad, use_reentrant=False
            )
        else:
            picked, ent = _chunk_log_probs(*args, temperature, entropy, entropy_grad)
        log_probs.append(picked)
        entropies.append(ent)
    out = torch.cat(log_probs).reshape(shape)
    return out, torch.cat(entropies).reshape(shape) if entropy else None


def _chunk_log_probs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float, entropy: bool, grad: bool
) -> tuple[Tensor, Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    normalizer = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1) - normalizer
    if not entropy:
        return picked, picked.new_zeros(())
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        log_p = torch.log_softmax(logits if grad else logits.detach(), dim=-1)
        ent = -(log_p.exp() * log_p).sum(-1)
    return picked, ent


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (all of them, or along ``dim``).

    An all-false mask gives 0.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / mask.sum().clamp_min(1)
    return total.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Bessel-corrected variance of ``values`` over the masked positions (0 for one position)."""
    mean = masked_mean(values, mask)
    biased = masked_mean((values - mean) ** 2, mask)
    count = mask.bool().sum()
    return biased * count / (count - 1).clamp_min(1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` with masked statistics; mean added back if not ``shift_mean``."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def approx_kl(log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token KL estimate from ``r = log_probs - ref_log_probs`` (Schulman's estimators).

    ``k1 = r``, ``k2 = r**2 / 2``, ``k3 = exp(-r) - 1 + r`` (``r`` clamped to
    ``±K3_LOG_RATIO_BOUND`` inside k3 so that it stays finite).
    """
    log_ratio = log_probs.float() - ref_log_probs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return log_ratio.square() / 2
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def last_valid_index(mask: Tensor) -> Tensor:
    """Index ``[B]`` of the last true position of each row of ``mask [B, T]`` (-1 for an empty row).

    Holes and padding on either side are allowed: it is the last 1, not the count of 1s.
    """
    mask = mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).amax(-1)


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards ``[B, T]``: ``-kl_coef * kl`` at valid positions, 0 elsewhere, plus
    ``scores[b]`` at the last valid position of row ``b`` (:func:`last_valid_index`).
    """
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl.float(), torch.zeros_like(kl, dtype=torch.float32))
    last = last_valid_index(mask)
    has_tokens = last >= 0
    bonus = torch.where(has_tokens, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    return rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), bonus.unsqueeze(1))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> GAEResult:
    """Generalised advantage estimation over ``[B, T]`` action tensors.

    The recursion ``A_t = delta_t + gamma * lam * A_{t'}`` runs over the positions where ``mask``
    is true only, ``t'`` being the next such position: a masked span between two trainable tokens
    is bridged (its rewards and values are ignored, the next value and the running advantage carry
    across it), so each row's advantages equal those of its compacted trainable sequence. The value
    after a row's last trainable token is 0; masked positions get advantage and return 0;
    ``returns = advantages + values``. Vectorised: the trainable positions of each row are moved
    to its front (a stable sort, the identity for a right-padded contiguous mask), the recursion is
    a product with a triangular discount matrix, and the results go back to their positions.
    """
    mask = mask.bool()
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # trainable positions first
    compact_mask = mask.gather(1, order)
    compact_rewards = torch.where(compact_mask, rewards.float().gather(1, order), 0.0)
    compact_values = torch.where(compact_mask, values.float().gather(1, order), 0.0)
    next_values = torch.cat([compact_values[:, 1:], torch.zeros_like(compact_values[:, :1])], dim=1)
    deltas = compact_rewards + gamma * next_values - compact_values
    advantages = deltas @ _discount_matrix(deltas.shape[1], gamma * lam, deltas.device)
    returns = advantages + compact_values
    # masked positions sit after each row's trainable ones, where both are exactly 0
    return GAEResult(
        torch.zeros_like(advantages).scatter(1, order, advantages),
        torch.zeros_like(returns).scatter(1, order, returns),
    )


def _discount_matrix(length: int, discount: float, device: torch.device) -> Tensor:
    """``W[s, t] = discount ** (s - t)`` for ``s >= t`` else 0, so ``(x @ W)[t] = sum_s>=t d^(s-t) x_s``."""
    steps = torch.arange(length, device=device, dtype=torch.float64)
    power = steps.unsqueeze(1) - steps.unsqueeze(0)
    weights = torch.full_like(power, discount) ** power.clamp_min(0)
    return torch.where(power >= 0, weights, 0.0).float()


def group_advantages(scores: Tensor, group_size: int, method: GroupMethod = "grpo") -> Tensor:
    """Critic-free advantages ``[B]`` from contiguous groups of ``group_size`` samples per prompt.

    ``grpo``: ``(s - mean) / (std + 1e-6)`` with the unbiased group std; ``dr_grpo``: ``s - mean``;
    ``rloo``: ``s`` minus the mean of the *other* samples of its group.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group advantage method {method!r}; valid: {', '.join(GROUP_METHODS)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of {group_size}")
    if group_size < 2 and method in ("grpo", "rloo"):
        raise ValueError(f"{method!r} needs at least 2 samples per prompt, got group_size={group_size}")
    groups = scores.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if method == "grpo":
        out = (groups - mean) / (groups.std(dim=1, keepdim=True) + 1e-6)
    elif method == "dr_grpo":
        out = groups - mean
    else:
        out = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return out.reshape(scores.shape)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    importance_weights: Tensor | None = None,
) -> Tensor:
    """PPO clipped surrogate loss, token mean over ``mask``.

    ``ratio = exp(log_probs - old_log_probs)``; loss per token
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)))``, and with
    ``dual_clip = c > 1`` the loss of tokens with ``A < 0`` is additionally capped at ``-c * A``.
    ``importance_weights`` (``[B, T]``, e.g. :func:`truncated_importance_weights`) multiply each
    token's loss before the mean.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    ratio = torch.exp(log_probs.float() - old_log_probs.float())
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    losses = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        losses = torch.where(advantages < 0, torch.minimum(losses, -dual_clip * advantages), losses)
    if importance_weights is not None:
        losses = losses * importance_weights
    return masked_mean(losses, mask)


def truncated_importance_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) weights ``[B, T]``: ``min(exp(old - rollout), cap)``, no gradient.

    When an engine samples with kernels that differ slightly from the trainer's, the tokens come
    from the engine's policy (``rollout_log_probs``) while PPO's ratio is against the trainer's
    (``old_log_probs``); weighting each token's loss by this ratio, truncated at ``cap``, corrects
    the mismatch with bounded variance.
    """
    if cap < 1:
        raise ValueError(f"TIS cap must be >= 1, got {cap}")
    return torch.exp(old_log_probs.float() - rollout_log_probs.float()).clamp(max=cap).detach()


def behaviour_weights(
    proximal_log_probs: Tensor, behaviour_log_probs: Tensor, mask: Tensor, cap: float, level: str = "token"
) -> Tensor:
    """The decoupled PPO loss's truncated behaviour weights ``[B, T]``, no gradient.

    The tokens were sampled by a behaviour policy μ (an engine's kernels, or an older policy version
    in an asynchronous rollout); PPO's ratio is taken against the proximal policy π_prox (the
    trainer's recomputed old log-probs). ``token``: ``min(π_prox / μ, cap)`` per token;
    ``sequence``: one weight per row, ``min(exp(Σ_t mask · (log π_prox − log μ)), cap)``, on every
    token of the row. With μ = π_prox every weight is exactly 1 (the loss is plain PPO's).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"behaviour weight level must be 'token' or 'sequence', got {level!r}")
    if level == "token":
        return truncated_importance_weights(proximal_log_probs, behaviour_log_probs, cap)
    if cap < 1:
        raise ValueError(f"behaviour weight cap must be >= 1, got {cap}")
    log_ratio = torch.where(mask, proximal_log_probs.float() - behaviour_log_probs.float(), 0.0).sum(-1, keepdim=True)
    return log_ratio.exp().clamp(max=cap).expand_as(proximal_log_probs).detach()


def clip_fraction(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> Tensor:
    """Fraction of valid tokens whose ratio lies outside ``[1 - clip_eps, 1 + clip_eps_high]``."""
    ratio = torch.exp(log_probs.float() - old_log_probs.float())
    high = clip_eps if clip_eps_high is None else clip_eps_high
    outside = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + high)
    return masked_mean(outside.float(), mask)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
) -> Tensor:
    """``0.5 * masked_mean(max((V - R)^2, (V_old + clip(V - V_old, ±clip_eps) - R)^2))``.

    ``clip_eps=None`` gives the unclipped ``0.5 * masked_mean((V - R)^2)``.
    """
    values, returns = values.float(), returns.float()
    losses = (values - returns).square()
    if clip_eps is not None:
        old_values = old_values.float()
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        losses = torch.maximum(losses, (clipped - returns).square())
    return 0.5 * masked_mean(losses, mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked positions (how much of the returns V explains)."""
    return 1.0 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-8)
