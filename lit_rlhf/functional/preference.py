"""Pure tensor math of preference optimisation: DPO and its variants (IPO, hinge, SimPO).

Per pair: ``y_w`` the chosen answer, ``y_l`` the rejected one, ``log pi(y|x)`` the sum of the
answer tokens' log-probs under the policy (``log pi_ref`` under the reference), and the margin
``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` (:func:`preference_logits`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

PreferenceLossType = Literal["sigmoid", "ipo", "hinge"]
PREFERENCE_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


class PreferenceLoss(NamedTuple):
    """Per-pair results ``[B]`` of a preference loss.

    losses: each pair's loss (their mean is the batch loss).
    chosen_rewards, rejected_rewards: the implicit rewards of the two answers, without gradient:
        ``beta * (log pi(y) - log pi_ref(y))`` (SimPO: ``beta * `` the average token log-prob).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def sequence_log_probs(log_probs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Each sequence's log-likelihood ``[B]``: ``log_probs [B, T]`` summed over ``mask`` (averaged with ``average``).

    ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over the answer tokens; an empty row gives 0.
    """
    mask = mask.bool()
    total = torch.where(mask, log_probs.float(), 0.0).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def preference_logits(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> Tensor:
    """``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` per pair ``[B]``, in fp32."""
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    return chosen - (policy_rejected_logps.float() - ref_rejected_logps.float())


def _check_preference_args(beta: float, label_smoothing: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def dpo_sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al., 2023, eq. 7) with conservative label smoothing (cDPO, Mitchell, 2023), per pair:

    ``loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``

    where ``h`` is the margin (:func:`preference_logits`) and ``eps = label_smoothing`` the assumed
    probability that a pair's preference is flipped; ``eps = 0`` is plain DPO.
    """
    _check_preference_args(beta, label_smoothing)
    scaled = beta * logits.float()
    smoothed = torch.nn.functional.logsigmoid(-scaled) * label_smoothing if label_smoothing else 0.0
    return -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(scaled) - smoothed


def ipo_loss(logits: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al., 2023, eq. 17), per pair: ``loss = (h - 1 / (2 * beta))^2``.

    ``beta`` is the paper's regularisation ``tau``: the margin is regressed to ``1 / (2 beta)``
    instead of being pushed to infinity, so a deterministic preference cannot overfit.
    """
    _check_preference_args(beta, 0.0)
    return (logits.float() - 1.0 / (2.0 * beta)).square()


def hinge_loss(logits: Tensor, beta: float) -> Tensor:
    """Hinge loss (SLiC, Zhao et al., 2023, on the DPO margin), per pair: ``loss = relu(1 - beta * h)``."""
    _check_preference_args(beta, 0.0)
    return torch.relu(1.0 - beta * logits.float())


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: PreferenceLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """A reference-based preference loss per pair and the implicit rewards of both answers.

    ``loss_type``: ``sigmoid`` (:func:`dpo_sigmoid_loss`, label smoothing allowed), ``ipo``
    (:func:`ipo_loss`) or ``hinge`` (:func:`hinge_loss`), all of the margin ``h``; rewards are
    ``beta * (log pi(y) - log pi_ref(y))``, exactly 0 while the policy equals the reference.
    All inputs are ``[B]`` sequence log-probs (:func:`sequence_log_probs`).
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {loss_type!r}; valid: {', '.join(PREFERENCE_LOSSES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined for the sigmoid loss only, got loss_type={loss_type!r}")
    logits = preference_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = dpo_sigmoid_loss(logits, beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(logits, beta)
    else:
        losses = hinge_loss(logits, beta)
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO (Meng et al., 2024, eq. 6): reference-free and length-normalised, per pair:

    ``z = beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma``,
    ``loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``

    where ``avg log pi(y)`` is the mean log-prob of the answer's tokens
    (:func:`sequence_log_probs` with ``average=True``), ``gamma`` the target reward margin and
    ``eps = label_smoothing`` as in :func:`dpo_sigmoid_loss` (0: the paper's loss). The implicit
    rewards are ``beta * avg log pi(y)``.
    """
    _check_preference_args(beta, label_smoothing)
    chosen, rejected = beta * chosen_avg_logps.float(), beta * rejected_avg_logps.float()
    z = chosen - rejected - gamma
    smoothed = torch.nn.functional.logsigmoid(-z) * label_smoothing if label_smoothing else 0.0
    losses = -(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(z) - smoothed
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())
