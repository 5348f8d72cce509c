"""Every formula of lit_rlhf.functional against a hand computation written out here."""

import math
import subprocess
import sys

import pytest
import torch

from lit_rlhf import functional as F
from lit_rlhf.functional.ppo import _discount_matrix as discount_matrix

ATOL, RTOL = 1e-6, 1e-5


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


def test_functional_imports_only_torch():
    heavy = "('lightning', 'pytorch_lightning', 'transformers', 'peft')"
    code = f"import sys, lit_rlhf.functional; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- log-probs -----------------------------------------------------------------------------


def test_log_probs_match_log_softmax_with_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    # T = 2: logits/2 = [.5, 1, 1.5] -> log p(2) = 1.5 - log(e^.5 + e^1 + e^1.5); row 2 uniform: -log 3
    expected = [[1.5 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5)), -math.log(3)]]
    before = logits.clone()
    close(F.log_probs_from_logits(logits, labels, temperature=2.0), expected)
    assert torch.equal(logits, before), "logits must not be modified in place"


def test_log_probs_bf16_large_vocab_is_fp32_and_accurate():
    logits = (torch.randn(2, 3, 50_000) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50_000, (2, 3))
    out = F.log_probs_from_logits(logits, labels, temperature=0.7)
    expected = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    close(out, expected.float(), atol=1e-4, rtol=1e-5)


def test_log_probs_reject_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        F.log_probs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0)


def test_entropy_of_uniform_and_peaked():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    close(F.entropy_from_logits(logits), [math.log(4), 0.0], atol=1e-5)
    close(F.entropy_from_logits(logits.to(torch.bfloat16).unsqueeze(0)), [[math.log(4), 0.0]], atol=1e-5)


# --- masked statistics -------------------------------------------------------------------


def test_masked_mean_var_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, float("nan"), float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # valid: 1, 2, 3, 4 -> mean 2.5, squared deviations 2.25+.25+.25+2.25 = 5, Bessel var 5/3
    close(F.masked_mean(values, mask), 2.5)
    close(F.masked_mean(values, mask, dim=1), [2.0, 4.0])
    close(F.masked_var(values, mask), 5 / 3)
    whitened = F.masked_whiten(values, mask)
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    close(whitened[0, :3], [(1 - 2.5) * scale, (2 - 2.5) * scale, (3 - 2.5) * scale])
    close(F.masked_whiten(values, mask, shift_mean=False)[1, 0], (4 - 2.5) * scale + 2.5)


def test_masked_var_single_token_and_empty_mask():
    values = torch.tensor([[7.0, 1.0]])
    close(F.masked_var(values, torch.tensor([[1, 0]])), 0.0)
    close(F.masked_mean(values, torch.zeros(1, 2)), 0.0)


# --- KL --------------------------------------------------------------------------------------


def test_approx_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    r = [0.5, -1.0]
    close(F.approx_kl(lp, ref, "k1"), r)
    close(F.approx_kl(lp, ref, "k2"), [x * x / 2 for x in r])
    close(F.approx_kl(lp, ref, "k3"), [math.exp(-x) - 1 + x for x in r])


def test_approx_kl_k3_stays_finite_for_extreme_ratios():
    lp, ref = torch.tensor([-200.0, 0.0]), torch.tensor([0.0, -200.0])
    out = F.approx_kl(lp, ref, "k3")
    assert torch.isfinite(out).all()
    b = F.K3_LOG_RATIO_BOUND
    close(out, [math.exp(b) - 1 - b, math.exp(-b) - 1 + b], rtol=1e-5)


def test_unknown_kl_estimator_lists_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        F.approx_kl(torch.zeros(1), torch.zeros(1), "k4")


# --- token rewards ---------------------------------------------------------------------------


def test_token_rewards_places_score_on_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    scores = torch.tensor([1.0, -2.0, 5.0])
    # row 0: -0.5*kl and +1 at t=2; row 1 (one valid token): -0.25 - 2; row 2 (empty): all zeros
    expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    close(F.token_rewards(scores, kl, mask, kl_coef=0.5), expected)


# --- GAE -----------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: the textbook backward recursion, one row and one step at a time."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        last = 0.0
        for t in reversed(range(rewards.shape[1])):
            r = rewards[b, t] if mask[b, t] else 0.0
            v = values[b, t] if mask[b, t] else 0.0
            v_next = values[b, t + 1] if t + 1 < rewards.shape[1] and mask[b, t + 1] else 0.0
            last = r + gamma * v_next - v + gamma * lam * last
            adv[b, t] = last
    return adv


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma=1, lam=.5: deltas = [0, 0, .5]; A2=.5, A1=0+.5*.5=.25, A0=.125
    adv, ret = F.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_vectorised_equals_reference_loop(gamma, lam):
    rewards, values = torch.randn(5, 17), torch.randn(5, 17)
    lengths = torch.tensor([17, 1, 9, 0, 4])
    mask = torch.arange(17) < lengths.unsqueeze(1)
    adv, ret = F.gae(rewards, values, mask, gamma, lam)
    expected = gae_loop(rewards, values, mask, gamma, lam)
    close(adv, expected, atol=1e-5)
    close(ret, expected + torch.where(mask, values, 0.0), atol=1e-5)
    assert torch.all(adv[~mask] == 0)


# --- masks with holes (multi-turn: tool output the policy did not sample) -------------------


def masked_gae_loop(rewards, values, mask, gamma, lam):
    """Reference for holes, one step at a time: the recursion skips masked positions, carrying the next
    value and the running advantage across them (as verl's masked GAE does)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        last, v_next = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            last = rewards[b, t] + gamma * v_next - values[b, t] + gamma * lam * last
            adv[b, t], v_next = last, values[b, t]
    return adv


def test_gae_over_holes_by_hand():
    # trainable t=0, t=3 (t=1,2 a tool's output): deltas over the compacted pair (r=[0, 1], v=[.5, .5])
    # with gamma=1, lam=.5: A3 = 1 - .5 = .5, A0 = 0 + .5 - .5 + .5 * .5 = .25
    rewards = torch.tensor([[0.0, 7.0, 7.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 0, 0, 1, 0]])
    adv, ret = F.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.25, 0.0, 0.0, 0.5, 0.0]])
    close(ret, [[0.75, 0.0, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_over_an_interleaved_mask_equals_gae_over_the_compacted_sequence(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 15, generator=generator), torch.randn(6, 15, generator=generator)
    mask = torch.rand(6, 15, generator=generator) < 0.6
    mask[0], mask[1] = True, False  # a full row and an empty one
    adv, ret = F.gae(rewards, values, mask, gamma, lam)
    close(adv, masked_gae_loop(rewards, values, mask, gamma, lam), atol=1e-6)
    for row in range(6):  # each row by itself, its trainable tokens side by side
        keep = mask[row]
        compact = F.gae(rewards[row, keep][None], values[row, keep][None], torch.ones(1, int(keep.sum())), gamma, lam)
        close(adv[row, keep], compact.advantages[0], atol=1e-6)
        close(ret[row, keep], compact.returns[0], atol=1e-6)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_gae_of_a_contiguous_mask_is_bitwise_the_prefix_recursion():
    rewards, values = torch.randn(4, 9), torch.randn(4, 9)
    mask = torch.arange(9) < torch.tensor([9, 3, 0, 5]).unsqueeze(1)
    adv, _ = F.gae(rewards, values, mask, 0.99, 0.95)
    deltas = torch.where(mask, rewards, 0.0)
    masked_values = torch.where(mask, values, 0.0)
    deltas = deltas + 0.99 * torch.cat([masked_values[:, 1:], torch.zeros(4, 1)], 1) - masked_values
    assert torch.equal(adv, deltas @ discount_matrix(9, 0.99 * 0.95, deltas.device))


def test_last_valid_index_and_the_score_land_on_the_last_trainable_token():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 0]])
    assert F.last_valid_index(mask).tolist() == [3, -1, 5, 4]
    rewards = F.token_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, 6), mask, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 0, 1, 0, 0], [0] * 6, [0, 0, 0, 0, 0, 3], [0, 0, 0, 0, 4, 0]]


def test_whitening_kl_and_losses_ignore_masked_tokens_and_their_logits():
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    values = torch.randn(2, 6, generator=generator)
    poisoned = torch.where(mask, values, torch.tensor(float("nan")))
    close(F.masked_whiten(poisoned, mask)[mask], F.masked_whiten(values[mask], torch.ones(int(mask.sum())))[:])
    kl = F.approx_kl(torch.randn(2, 6, generator=generator), torch.randn(2, 6, generator=generator), "k3")
    close(F.masked_mean(torch.where(mask, kl, float("inf")), mask), kl[mask].mean())
    # logits at masked positions change neither the policy loss nor any gradient
    logits = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    labels = torch.randint(11, (2, 6), generator=generator)
    old, adv = torch.randn(2, 6, generator=generator), torch.randn(2, 6, generator=generator)

    def loss_and_grad(x):
        x = x.detach().requires_grad_(True)
        lp = F.log_probs_from_logits(x, labels)
        loss = F.policy_loss(lp, old, adv, mask) + F.masked_mean(F.entropy_from_logits(x), mask)
        loss.backward()
        return loss.detach(), x.grad

    changed = logits.detach().clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 11, generator=generator)
    loss_a, grad_a = loss_and_grad(logits)
    loss_b, grad_b = loss_and_grad(changed)
    assert loss_a == loss_b
    assert torch.equal(grad_a[mask], grad_b[mask]) and not grad_a[~mask].any() and not grad_b[~mask].any()


# --- group advantages --------------------------------------------------------------------


def test_group_advantages_methods():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, unbiased std 1; group 2: zero variance
    close(F.group_advantages(scores, 3, "grpo"), [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    close(F.group_advantages(scores, 3, "dr_grpo"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # rloo: s - mean(others): 1 - 2.5, 2 - 2, 3 - 1.5
    close(F.group_advantages(scores, 3, "rloo"), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo"):
        F.group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="groups of 3"):
        F.group_advantages(torch.zeros(4), 3, "grpo")
    with pytest.raises(ValueError, match="at least 2"):
        F.group_advantages(torch.zeros(4), 1, "rloo")


# --- policy loss ---------------------------------------------------------------------------


def test_policy_loss_every_branch():
    # ratios exp(log 0.5), 1, exp(log 1.5) against A = +1 and A = -1, clip 0.2
    log_ratio = torch.log(torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.zeros(6)
    mask = torch.ones(6)
    # per token max(-A r, -A clip(r, .8, 1.2)):
    #   A=+1: r=.5 -> max(-.5, -.8) = -.5 ; r=1 -> -1 ; r=1.5 -> max(-1.5, -1.2) = -1.2
    #   A=-1: r=.5 -> max(.5, .8) = .8    ; r=1 -> 1  ; r=1.5 -> max(1.5, 1.2) = 1.5
    per_token = torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5])
    close(F.policy_loss(log_ratio, old, adv, mask, clip_eps=0.2), per_token.mean())
    # only the masked-in tokens count
    close(F.policy_loss(log_ratio, old, adv, torch.tensor([1, 0, 1, 0, 0, 1]), 0.2), (-0.5 - 1.2 + 1.5) / 3)
    # asymmetric upper clip 0.3: A=+1, r=1.5 -> max(-1.5, -1.3) = -1.3
    close(F.policy_loss(log_ratio[2:3], old[:1], adv[:1], mask[:1], 0.2, clip_eps_high=0.3), -1.3)
    # dual clip c=1.4 caps A<0 losses at -c*A = 1.4: 1.5 -> 1.4
    dual = torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.4])
    close(F.policy_loss(log_ratio, old, adv, mask, 0.2, dual_clip=1.4), dual.mean())


def test_policy_loss_extreme_log_ratios_stay_bounded():
    lp = torch.tensor([60.0, -60.0, 60.0])
    adv = torch.tensor([1.0, 1.0, -2.0])
    # A>0, r huge -> clipped -1.2; A>0, r~0 -> max(~0, -.8) = ~0; A<0, r huge -> dual clip 3*2 = 6
    out = F.policy_loss(lp, torch.zeros(3), adv, torch.ones(3), 0.2, dual_clip=3.0)
    close(out, (-1.2 + 0.0 + 6.0) / 3, atol=1e-5)


def test_policy_loss_masked_positions_change_nothing():
    lp, old, adv = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    base = F.policy_loss(lp, old, adv, mask)
    lp2 = lp.clone()
    lp2[~mask.bool()] = float("inf")
    close(F.policy_loss(lp2, old, adv, mask), base)


def test_truncated_importance_weights_and_weighted_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    rollout = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    # exp(old - rollout) = 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.1 = 9 -> capped at 3
    weights = F.truncated_importance_weights(old, rollout, cap=3.0)
    close(weights, torch.tensor([[2.0, 0.5, 3.0]]))
    assert not weights.requires_grad
    # the same ratios against A = +1 as test_policy_loss_every_branch: per token -0.5, -1, -1.2
    log_probs = old + torch.log(torch.tensor([[0.5, 1.0, 1.5]]))
    mask = torch.ones(1, 3)
    adv = torch.ones(1, 3)
    expected = (2.0 * -0.5 + 0.5 * -1.0 + 3.0 * -1.2) / 3
    close(F.policy_loss(log_probs, old, adv, mask, 0.2, importance_weights=weights), torch.tensor(expected))
    # weights of 1 change nothing; a cap below 1 is refused
    plain = F.policy_loss(log_probs, old, adv, mask, 0.2)
    close(F.policy_loss(log_probs, old, adv, mask, 0.2, importance_weights=torch.ones(1, 3)), plain)
    with pytest.raises(ValueError, match="cap"):
        F.truncated_importance_weights(old, rollout, cap=0.5)


def test_behaviour_weights_by_hand_per_token_and_per_sequence():
    proximal = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 0.5]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.6, 0.2, 0.5]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # per token: 2, 0.5, 9 -> 3 (capped); 0.5, 3, 1
    close(F.behaviour_weights(proximal, behaviour, mask, 3.0), torch.tensor([[2.0, 0.5, 3.0], [0.5, 3.0, 1.0]]))
    # per sequence: the product of the valid tokens' ratios, on every token: 2 * 0.5 = 1 (the masked 9 is not in
    # it); 0.5 * 3 * 1 = 1.5, capped at 1.2
    weights = F.behaviour_weights(proximal, behaviour, mask, 1.2, "sequence")
    close(weights, torch.tensor([[1.0, 1.0, 1.0], [1.2, 1.2, 1.2]]))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        F.behaviour_weights(proximal, behaviour, mask, 2.0, "row")
    with pytest.raises(ValueError, match="cap"):
        F.behaviour_weights(proximal, behaviour, mask, 0.5, "sequence")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_decoupled_loss_is_plain_ppo_when_the_behaviour_policy_is_the_proximal_one(level):
    g = torch.Generator().manual_seed(3)
    proximal, advantages = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    log_probs = (proximal + 0.3 * torch.randn(4, 6, generator=g)).requires_grad_()
    weights = F.behaviour_weights(proximal, proximal.clone(), mask, 2.0, level)
    assert torch.equal(weights, torch.ones(4, 6))
    decoupled = F.policy_loss(log_probs, proximal, advantages, mask, 0.2, importance_weights=weights)
    plain = F.policy_loss(log_probs, proximal, advantages, mask, 0.2)
    assert torch.equal(decoupled, plain)  # exactly, not approximately
    assert torch.equal(torch.autograd.grad(decoupled, log_probs)[0], torch.autograd.grad(plain, log_probs)[0])


def test_policy_loss_rejects_dual_clip_below_one():
    with pytest.raises(ValueError, match="dual_clip"):
        F.policy_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1), dual_clip=0.9)


def test_clip_fraction():
    log_ratio = torch.log(torch.tensor([0.5, 1.0, 1.1, 1.5]))
    close(F.clip_fraction(log_ratio, torch.zeros(4), torch.ones(4), 0.2), 0.5)
    close(F.clip_fraction(log_ratio, torch.zeros(4), torch.ones(4), 0.2, clip_eps_high=0.6), 0.25)


# --- value loss ----------------------------------------------------------------------------


def test_value_loss_clipped_and_unclipped():
    values = torch.tensor([1.0, 0.0, 2.0])
    old = torch.tensor([0.5, 0.0, 0.0])
    returns = torch.tensor([0.0, 1.0, 2.0])
    mask = torch.ones(3)
    # unclipped (V-R)^2 = 1, 1, 0
    close(F.value_loss(values, old, returns, mask, clip_eps=None), 0.5 * 2 / 3)
    # clipped V: .5 + clip(.5, ±.2) = .7 -> .49; 0 -> 1; 0 + .2 = .2 -> (.2-2)^2 = 3.24
    # max: 1, 1, 3.24
    close(F.value_loss(values, old, returns, mask, clip_eps=0.2), 0.5 * (1 + 1 + 3.24) / 3)
    close(F.value_loss(values, old, returns, torch.tensor([1, 0, 0]), clip_eps=0.2), 0.5)


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    close(F.explained_variance(returns, returns, torch.ones(4)), 1.0, atol=1e-6)
    close(F.explained_variance(torch.zeros(4), returns, torch.ones(4)), 0.0, atol=1e-6)
