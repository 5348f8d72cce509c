"""The rollout runner: one rollout's experience equals a hand computation with lit_rlhf.functional on
the same tensors; its two steps, sample and score, each run on their own."""

import dataclasses

import pytest
import torch

from lit_rlhf import functional as F
from lit_rlhf.models import Actor, ValueModel, load_tokenizer
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.rewards.scorer import Scores
from lit_rlhf.rollout import NativeEngine
from lit_rlhf.rollout.kl_control import KLController
from lit_rlhf.rollout.metrics import rollout_metrics
from lit_rlhf.rollout.runner import RolloutRunner
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, LoadSettings, RolloutSettings


def runner(models, score_fn, *, generation, rollout=RolloutSettings(), algorithm, kl, kl_coef=0.0, seed=0):
    """A runner of the actor's own sampler, as the PPO module builds it."""
    engine = NativeEngine()
    engine.start(models.actor, "cpu")
    settings = dict(generation=generation, rollout=rollout, algorithm=algorithm, kl=kl)
    return RolloutRunner(models, engine, score_fn, **settings, kl_coef=KLController(kl_coef), seed=seed)


def make_experience(models, prompts, score_fn, *, rollout_id=0, **settings):
    return runner(models, score_fn, **settings).collect(rollout_id, prompts)


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
    policy = PolicySet(actor, reference, critic, LoadSettings(), tok, tiny_assets["policy"], tiny_assets["reward"])
    return tok, policy, reward, prompts


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
    exp, reward_parts, timing, _ = make_experience(
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
    seq, attn, mask, A = exp.sequences, exp.attention_mask, exp.loss_mask, exp.num_actions
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
    assert "reward/zero_std_fraction" not in metrics  # one sample per group: no groups to speak of
    # pairs of contiguous rows: (1, 1) and (0.5, 0.5 + 1e-7) scored alike, (0, 2) did not
    tied = dataclasses.replace(exp, scores=torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5, 0.5 + 1e-7]))
    grouped = rollout_metrics(tied, reward_parts, rollout_models.actor.eos_token_ids, group_size=2)
    torch.testing.assert_close(grouped["reward/zero_std_fraction"], torch.tensor(2 / 3))
    torch.testing.assert_close(grouped["reward/mean"], tied.scores.mean())


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_estimators_broadcast_group_advantages_without_critic(models, method):
    tok, rollout_models, reward, prompts = models
    rollout_models.critic = None
    exp, *_ = make_experience(
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
    mask = exp.loss_mask
    # with gamma = 1 and no KL in the reward, every valid token carries its sequence's group advantage
    torch.testing.assert_close(exp.advantages, expected.unsqueeze(1) * mask, atol=1e-6, rtol=1e-6)
    assert torch.all(exp.values == 0)


def test_reinforce_pp_whitens_discounted_returns(models):
    tok, rollout_models, reward, prompts = models
    rollout_models.critic = None
    exp, *_ = make_experience(
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
    mask = exp.loss_mask
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
        exp, *_ = make_experience(
            rollout_models,
            prompts,
            reward_model_scores(reward),
            generation=GenerationSettings(max_new_tokens=8, temperature=1.5, n_samples_per_prompt=2),
            rollout=rollout,
            algorithm=AlgorithmSettings(),
            kl=KLSettings(),
            kl_coef=0.1,
            rollout_id=0,
        )
        runs[name] = exp
    a, b = runs["rows"], runs["budget"]
    assert torch.equal(a.sequences, b.sequences) and a.loss_mask.sum(1).unique().numel() > 1
    mask = a.loss_mask  # outside it: padding, masked out of every loss
    for field in ("ref_log_probs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, field)[mask], getattr(a, field)[mask], atol=1e-5, rtol=1e-5, msg=field)


def test_sample_and_score_run_on_their_own_and_compose_to_collect(models):
    tok, rollout_models, reward, prompts = models
    settings = dict(
        generation=GenerationSettings(max_new_tokens=6, temperature=1.2, n_samples_per_prompt=2),
        algorithm=AlgorithmSettings(),
        kl=KLSettings(),
        kl_coef=0.05,
    )
    collected = runner(rollout_models, reward_model_scores(reward), **settings).collect(4, prompts).experience
    steps = runner(rollout_models, reward_model_scores(reward), **settings)
    sampled = steps.sample(4, prompts)
    assert sampled.rollout == 4 and sampled.prompts[:2] == ["12+34=", "12+34="]
    assert sampled.generation.loss_mask.shape == sampled.generation.log_probs.shape
    again = steps.sample(4, prompts)  # a pure function of the rollout index, the seed and the weights
    assert torch.equal(again.generation.sequences, sampled.generation.sequences)
    assert not torch.equal(steps.sample(5, prompts).generation.sequences, sampled.generation.sequences)
    scored = steps.score(sampled).experience
    for field in ("sequences", "loss_mask", "old_log_probs", "ref_log_probs", "values", "advantages", "returns"):
        assert torch.equal(getattr(scored, field), getattr(collected, field)), field


def test_the_kl_coefficient_is_read_live_from_the_controller_at_every_rollout(models):
    tok, rollout_models, reward, prompts = models
    steps = runner(
        rollout_models,
        reward_model_scores(reward),
        generation=GenerationSettings(max_new_tokens=4),
        algorithm=AlgorithmSettings(),
        kl=KLSettings(estimator="k1"),
        kl_coef=0.0,
    )
    sampled = steps.sample(0, prompts)
    before = steps.score(sampled).experience
    steps.kl_coef.value = 0.5  # what an adaptive controller does between rollouts
    after = steps.score(sampled).experience
    mask = before.loss_mask
    torch.testing.assert_close(after.rewards - before.rewards, -0.5 * before.kl * mask, atol=1e-6, rtol=0)
