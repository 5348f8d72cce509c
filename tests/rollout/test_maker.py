"""One rollout's experience equals a hand computation with lit_rlhf.functional on the same tensors."""

import pytest
import torch

from lit_rlhf import functional as F
from lit_rlhf.models import Actor, ValueModel, load_tokenizer
from lit_rlhf.rollout.maker import RolloutModels, Scores, make_experience, rollout_metrics
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, RolloutSettings


@pytest.fixture
def models(tiny_assets):
    tok = load_tokenizer(tiny_assets["policy"])
    actor = Actor.from_pretrained(tiny_assets["policy"], tok)
    with torch.no_grad():  # make the reference differ from the actor so the KL is not zero
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = Actor.from_pretrained(tiny_assets["policy"], tok)
    critic = ValueModel.from_pretrained(tiny_assets["reward"])
    reward = ValueModel.from_pretrained(tiny_assets["reward"])
    texts = ["12+34=", "07-03=", "99+99="]
    enc = tok(texts, return_tensors="pt")
    prompts = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "prompts": texts,
        "columns": {"answer": ["46", "04", "198"]},
    }
    return tok, RolloutModels(actor, critic, reference), reward, prompts


def reward_model_scores(reward, seen=None):
    """A score function reading the reward model; records what it was given in ``seen``."""

    def score(gen, prompts, columns):
        if seen is not None:
            seen.update(prompts=prompts, columns=columns)
        scores = reward.score(gen.sequences, gen.attention_mask)
        return Scores(scores, {"score": scores, "double": 2 * scores})

    return score


def test_gae_experience_matches_hand_computation(models):
    tok, rollout_models, reward, prompts = models
    seen = {}
    exp, reward_parts, timing = make_experience(
        rollout_models,
        prompts,
        reward_model_scores(reward, seen),
        generation=GenerationSettings(max_new_tokens=5, temperature=0.8, n_samples_per_prompt=2),
        rollout=RolloutSettings(score_micro_batch_size=4),
        algorithm=AlgorithmSettings(advantage_estimator="gae", gamma=0.99, lam=0.9, whiten_advantages=True),
        kl=KLSettings(estimator="k1"),
        kl_coef=0.1,
        rollout_id=3,
    )
    # prompts are repeated in contiguous groups, with their texts and columns
    assert torch.equal(exp.sequences[:, :6], prompts["input_ids"].repeat_interleave(2, 0))
    assert seen["prompts"] == ["12+34=", "12+34=", "07-03=", "07-03=", "99+99=", "99+99="]
    assert seen["columns"] == {"answer": ["46", "46", "04", "04", "198", "198"]}
    seq, attn, mask, A = exp.sequences, exp.attention_mask, exp.action_mask, exp.num_actions
    with torch.no_grad():
        old = rollout_models.actor(seq, attn, A, 0.8)
        ref = rollout_models.reference(seq, attn, A, 0.8)
        values = rollout_models.critic(seq, attn, A)
        scores = reward.score(seq, attn)
    kl = F.approx_kl(old, ref, "k1") * mask
    rewards = F.token_rewards(scores, kl, mask, 0.1)
    adv, returns = F.gae(rewards, values, mask, 0.99, 0.9)
    adv = F.masked_whiten(adv, mask) * mask
    # old log-probs come from the sampler (KV-cache decoding): equal to a full forward on valid tokens
    torch.testing.assert_close(exp.old_log_probs[mask], old[mask], atol=1e-5, rtol=1e-5)
    for name, expected in dict(
        ref_log_probs=ref,
        values=values,
        scores=scores,
        kl=kl,
        rewards=rewards,
        advantages=adv,
        returns=returns,
    ).items():
        torch.testing.assert_close(getattr(exp, name), expected, atol=1e-5, rtol=1e-5, msg=name)
    assert exp.rollout_id.tolist() == [3] * 6
    assert timing["generated_tokens"] == mask.sum().item()
    metrics = rollout_metrics(exp, reward_parts, rollout_models.actor.eos_token_ids)
    torch.testing.assert_close(metrics["reward/mean"], scores.mean())
    torch.testing.assert_close(metrics["reward/score"], scores.mean())
    torch.testing.assert_close(metrics["reward/double"], 2 * scores.mean())
    torch.testing.assert_close(metrics["rollout/kl"], kl.sum(-1).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_estimators_broadcast_group_advantages_without_critic(models, method):
    tok, rollout_models, reward, prompts = models
    rollout_models.critic = None
    exp, _, _ = make_experience(
        rollout_models,
        prompts,
        reward_model_scores(reward),
        generation=GenerationSettings(max_new_tokens=4, n_samples_per_prompt=4),
        rollout=RolloutSettings(),
        algorithm=AlgorithmSettings(advantage_estimator=method, whiten_advantages=False),
        kl=KLSettings(penalty="loss", estimator="k3"),
        kl_coef=0.1,
        rollout_id=0,
    )
    expected = F.group_advantages(exp.scores, 4, method)
    mask = exp.action_mask
    # with gamma = 1 and no KL in the reward, every valid token carries its sequence's group advantage
    torch.testing.assert_close(exp.advantages, expected.unsqueeze(1) * mask, atol=1e-6, rtol=1e-6)
    assert torch.all(exp.values == 0)


def test_reinforce_pp_whitens_discounted_returns(models):
    tok, rollout_models, reward, prompts = models
    rollout_models.critic = None
    exp, _, _ = make_experience(
        rollout_models,
        prompts,
        reward_model_scores(reward),
        generation=GenerationSettings(max_new_tokens=4),
        rollout=RolloutSettings(),
        algorithm=AlgorithmSettings(advantage_estimator="reinforce_pp", gamma=1.0, whiten_advantages=True),
        kl=KLSettings(),
        kl_coef=0.1,
        rollout_id=0,
    )
    mask = exp.action_mask
    returns = exp.rewards.flip(-1).cumsum(-1).flip(-1) * mask  # reward-to-go
    torch.testing.assert_close(exp.returns, returns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.advantages, F.masked_whiten(returns, mask) * mask, atol=1e-5, rtol=1e-5)


def test_scoring_groups_by_length_give_the_results_of_plain_micro_batches(models):
    """Rows sorted into micro-batches of similar length (and a token budget) score exactly as before."""
    tok, rollout_models, reward, prompts = models
    runs = {}
    for name, rollout in (
        ("rows", RolloutSettings(score_micro_batch_size=6)),
        ("budget", RolloutSettings(score_micro_batch_size=4, score_micro_batch_tokens=20)),
    ):
        exp, _, _ = make_experience(
            rollout_models,
            prompts,
            reward_model_scores(reward),
            generation=GenerationSettings(max_new_tokens=8, temperature=1.5, n_samples_per_prompt=2),
            rollout=rollout,
            algorithm=AlgorithmSettings(),
            kl=KLSettings(),
            kl_coef=0.1,
            rollout_id=0,
            generator=torch.Generator().manual_seed(0),
        )
        runs[name] = exp
    a, b = runs["rows"], runs["budget"]
    assert torch.equal(a.sequences, b.sequences) and a.action_mask.sum(1).unique().numel() > 1
    mask = a.action_mask  # outside it: padding, masked out of every loss
    for field in ("ref_log_probs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, field)[mask], getattr(a, field)[mask], atol=1e-5, rtol=1e-5, msg=field)
