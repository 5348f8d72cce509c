"""The preference losses of ``lit_rlhf.functional`` against hand computations and the published formulas.

Every expected value is derived in a comment; ``softplus(x) = log(1 + e^x) = -log sigmoid(-x)``.
"""

import math

import pytest
import torch

from lit_rlhf import functional as F

TOL = {"atol": 1e-6, "rtol": 1e-6}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def close(actual, expected) -> None:
    expected = expected.detach() if isinstance(expected, torch.Tensor) else torch.tensor(expected)
    torch.testing.assert_close(actual, expected.float(), **TOL)


# two pairs: policy and reference sequence log-probs (sums over the answer tokens)
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
# h = (pc - rc) - (pr - rr) = [(-1+2) - (-3+2), (-2+2) - (-1+2)] = [1 + 1, 0 - 1] = [2, -1]
MARGINS = [2.0, -1.0]


def test_sequence_log_probs_sum_or_average_the_answer_tokens_only():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), float("inf")], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # row 0: -1 - 2 = -3 (mean -1.5); row 1: -0.5 (nan/inf are masked out); row 2: empty -> 0
    close(F.sequence_log_probs(log_probs, mask), [-3.0, -0.5, 0.0])
    close(F.sequence_log_probs(log_probs, mask, average=True), [-1.5, -0.5, 0.0])


def test_preference_logits_are_the_log_ratio_margin():
    close(F.preference_logits(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED), MARGINS)


def test_dpo_sigmoid_loss_is_rafailov_eq7():
    # beta = 0.5: beta * h = [1, -0.5]; loss = -log sigmoid(beta h) = softplus(-beta h)
    losses = F.dpo_sigmoid_loss(torch.tensor(MARGINS), beta=0.5)
    close(losses, [softplus(-1.0), softplus(0.5)])  # [0.3132617, 0.9740770]
    close(losses, -torch.nn.functional.logsigmoid(0.5 * torch.tensor(MARGINS)))


def test_label_smoothed_dpo_is_conservative_dpo():
    # eps = 0.2: loss = 0.8 * softplus(-beta h) + 0.2 * softplus(beta h), beta h = [1, -0.5]
    losses = F.dpo_sigmoid_loss(torch.tensor(MARGINS), beta=0.5, label_smoothing=0.2)
    close(losses, [0.8 * softplus(-1.0) + 0.2 * softplus(1.0), 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)])
    # its gradient at h = 0 is beta * (2 eps - 1) / 2 = 0.5 * (0.4 - 1) / 2 = -0.15 (not -0.25 as plain DPO):
    # the flipped-label term caps how hard a pair is pushed
    h = torch.zeros(1, requires_grad=True)
    F.dpo_sigmoid_loss(h, beta=0.5, label_smoothing=0.2).sum().backward()
    close(h.grad, [-0.15])
    # and it is minimal at beta h = log((1 - eps) / eps) = log 4: finite, unlike plain DPO's
    h = torch.tensor([2 * math.log(4.0)], requires_grad=True)
    F.dpo_sigmoid_loss(h, beta=0.5, label_smoothing=0.2).sum().backward()
    close(h.grad, [0.0])


def test_ipo_loss_is_azar_eq17():
    # beta = 0.25: target 1 / (2 beta) = 2; (h - 2)^2 = [(2 - 2)^2, (-1 - 2)^2] = [0, 9]
    close(F.ipo_loss(torch.tensor(MARGINS), beta=0.25), [0.0, 9.0])


def test_hinge_loss_is_relu_of_one_minus_beta_h():
    # beta = 0.5: relu(1 - 0.5 * [2, -1]) = relu([0, 1.5]) = [0, 1.5]
    close(F.hinge_loss(torch.tensor(MARGINS), beta=0.5), [0.0, 1.5])


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("sigmoid", [softplus(-1.0), softplus(0.5)]),  # beta h = [1, -0.5]
        ("ipo", [(2.0 - 1.0) ** 2, (-1.0 - 1.0) ** 2]),  # 1 / (2 * 0.5) = 1
        ("hinge", [0.0, 1.5]),
    ],
)
def test_dpo_loss_dispatches_and_returns_the_implicit_rewards(loss_type, expected):
    result = F.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss_type=loss_type)
    close(result.losses, expected)
    # rewards = beta * (policy - reference): chosen 0.5 * [1, 0] = [0.5, 0], rejected 0.5 * [-1, 1] = [-0.5, 0.5]
    close(result.chosen_rewards, [0.5, 0.0])
    close(result.rejected_rewards, [-0.5, 0.5])
    assert not result.chosen_rewards.requires_grad


def test_policy_equal_to_reference_gives_exactly_zero_rewards():
    """The first step of a run: the policy is the reference, so every implicit reward is exactly 0."""
    chosen = torch.tensor([-7.25, -0.125, -31.5], requires_grad=True)
    rejected = torch.tensor([-6.0, -2.5, -30.0], requires_grad=True)
    for loss_type, beta, first_loss in (
        ("sigmoid", 0.1, math.log(2.0)),  # -log sigmoid(0)
        ("ipo", 0.1, 25.0),  # (0 - 1 / 0.2)^2
        ("hinge", 0.1, 1.0),  # relu(1 - 0)
    ):
        result = F.dpo_loss(chosen, rejected, chosen.detach().clone(), rejected.detach().clone(), beta, loss_type)
        assert result.chosen_rewards.tolist() == [0.0, 0.0, 0.0] and result.rejected_rewards.tolist() == [0.0] * 3
        close(result.losses, [first_loss] * 3)
    # the first DPO gradient raises the chosen answer and lowers the rejected one: d loss / d pc = -beta / 2
    F.dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1).losses.sum().backward()
    close(chosen.grad, [-0.05] * 3)
    close(rejected.grad, [0.05] * 3)


def test_simpo_is_meng_eq6_with_its_margin():
    chosen_avg, rejected_avg = torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -0.8])
    # beta = 2, gamma = 0.5: z = 2 * (avg_w - avg_l) - 0.5 = [2 * 1.0 - 0.5, 2 * -0.2 - 0.5] = [1.5, -0.9]
    result = F.simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=0.5)
    close(result.losses, [softplus(-1.5), softplus(0.9)])  # -log sigmoid(z): [0.2014133, 1.2411538]
    close(result.chosen_rewards, [-1.0, -2.0])  # beta * avg_w
    close(result.rejected_rewards, [-3.0, -1.6])
    # label smoothing eps = 0.1: 0.9 * softplus(-z) + 0.1 * softplus(z)
    smoothed = F.simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=0.5, label_smoothing=0.1)
    close(smoothed.losses, [0.9 * softplus(-1.5) + 0.1 * softplus(1.5), 0.9 * softplus(0.9) + 0.1 * softplus(-0.9)])
    # the margin: equal averages are still penalised, -log sigmoid(-gamma) = softplus(0.5)
    close(F.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=2.0, gamma=0.5).losses, [softplus(0.5)])


def test_simpo_is_length_normalised():
    """The same per-token log-probs give the same SimPO loss however long the answers are."""
    short = F.sequence_log_probs(torch.full((2, 2), -0.7), torch.ones(2, 2), average=True)
    long = F.sequence_log_probs(torch.full((2, 9), -0.7), torch.ones(2, 9), average=True)
    a = F.simpo_loss(short[:1], short[1:] - 0.3, beta=2.0, gamma=0.5).losses
    b = F.simpo_loss(long[:1], long[1:] - 0.3, beta=2.0, gamma=0.5).losses
    close(a, b.tolist())
    close(a, [softplus(-(2.0 * 0.3 - 0.5))])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: F.dpo_sigmoid_loss(torch.zeros(1), beta=0.0), "beta must be > 0, got 0.0"),
        (lambda: F.dpo_sigmoid_loss(torch.zeros(1), beta=0.1, label_smoothing=0.5), "label_smoothing must be in"),
        (lambda: F.ipo_loss(torch.zeros(1), beta=-1.0), "beta must be > 0"),
        (lambda: F.dpo_loss(*[torch.zeros(1)] * 4, loss_type="kto"), "unknown preference loss 'kto'; valid: sigmoid"),
        (lambda: F.dpo_loss(*[torch.zeros(1)] * 4, loss_type="ipo", label_smoothing=0.1), "sigmoid loss only"),
        (lambda: F.simpo_loss(torch.zeros(1), torch.zeros(1), beta=0.0), "beta must be > 0"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
