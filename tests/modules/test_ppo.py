"""PPOModule end to end on the tiny task: data flow, learning, critic-free runs, resume, bad input."""

import copy

import lightning as L
import pytest
import torch

from lit_rlhf import PPOModule
from lit_rlhf.models import GenerationOutput
from lit_rlhf.modules.ppo_step import ppo_micro_step
from lit_rlhf.rewards import RewardModel
from lit_rlhf.rewards.model import append_eos
from tests.helpers import SevensPPO, datamodule, fit, trainer


class Recorder(L.Callback):
    """Records, for every training step, the epoch and the rollout ids / buffer rows it trained on."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        rows = module.buffer.get(batch)
        self.steps.append((trainer.current_epoch, batch.tolist(), rows.rollout_id.tolist()))


def metrics(t):
    import pandas as pd

    return pd.read_csv(f"{t.logger.log_dir}/metrics.csv")


def test_every_mini_batch_comes_from_its_epochs_rollout_and_each_experience_is_used_ppo_epochs_times(make, tmp_path):
    recorder = Recorder()
    fit(tmp_path, make(algorithm={"ppo_epochs": 3}), 2, [recorder])
    assert len(recorder.steps) == 2 * 3 * 16 // 8
    for epoch in (0, 1):
        steps = [s for s in recorder.steps if s[0] == epoch]
        assert all(set(ids) == {epoch} for _, _, ids in steps)
        used = torch.bincount(torch.tensor([i for _, rows, _ in steps for i in rows]), minlength=16)
        assert used.tolist() == [3] * 16


def test_first_mini_batch_ratio_is_exactly_one(make, tmp_path):
    seen = {}

    class Check(SevensPPO):
        def training_step(self, indices, batch_idx):
            if not seen:
                batch = self.buffer.get(indices)
                log_probs = self.actor(batch.sequences, batch.attention_mask, batch.num_actions, 1.0)
                seen["max_diff"] = (log_probs - batch.old_log_probs)[batch.loss_mask].abs().max().item()
                critic_values = self.critic(batch.sequences, batch.attention_mask, batch.num_actions)
                seen["value_diff"] = (critic_values - batch.values)[batch.loss_mask].abs().max().item()
            return super().training_step(indices, batch_idx)

    fit(tmp_path, make(Check), 1)
    assert seen["max_diff"] < 1e-5 and seen["value_diff"] < 1e-5


def test_custom_reward_rises_and_large_kl_stays_closer_to_reference(make, tmp_path):
    free = fit(tmp_path / "free", make(kl={"coef": 1e-4}), 10)  # nearly free, its KL still measured
    tied = fit(tmp_path / "tied", make(kl={"coef": 2.0}), 10)
    rewards = metrics(free)["reward/mean"].dropna().tolist()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    kl_free = metrics(free)["rollout/kl"].dropna().tolist()[-3:]
    kl_tied = metrics(tied)["rollout/kl"].dropna().tolist()[-3:]
    assert sum(kl_tied) < 0.7 * sum(kl_free), (kl_free, kl_tied)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo", "reinforce_pp"])
def test_critic_free_estimators_train_without_a_critic(make, tmp_path, estimator):
    module = make(
        algorithm={"advantage_estimator": estimator},
        generation={"n_samples_per_prompt": 4},
        rollout={"rollout_batch_size": 4},
        kl={"penalty": "loss", "estimator": "k3", "coef": 0.05},
    )
    t = fit(tmp_path, module, 2)
    assert module.critic is None and not isinstance(module.optimizers(), list)
    logged = metrics(t)
    assert "policy/kl_loss" in logged.columns and "critic/loss" not in logged.columns
    zero_std = logged["reward/zero_std_fraction"].dropna()
    assert len(zero_std) == 2 and zero_std.between(0, 1).all()  # a share of the rollout's 4 groups
    assert (zero_std * 4).round().sub(zero_std * 4).abs().max() < 1e-6


def test_frozen_models_unchanged_trainable_changed_and_left_out_of_checkpoints(make, tmp_path):
    module = make()
    module.configure_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    t = fit(tmp_path, module, 1)
    after = module.state_dict()
    for key, value in after.items():
        if key.startswith("reference."):
            assert torch.equal(value, before[key]), key
    changed = [k for k in after if k.startswith(("actor.", "critic.")) and not torch.equal(after[k], before[k])]
    assert any(k.startswith("actor.") for k in changed) and any(k.startswith("critic.") for k in changed)
    assert all(not p.requires_grad for p in module.reference.parameters())
    optimized = {id(p) for opt in module.optimizers() for g in opt.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in module.reference.parameters()}
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert not any(k.startswith(("reference.", "rewards.")) for k in saved["state_dict"])
    assert "kl_controller" in saved and "rng_states" in saved


def test_reward_model_component_scores_with_the_frozen_reward_model(make, tmp_path):
    module = make(PPOModule, rewards=[RewardModel(make().assets["reward"])])
    fit(tmp_path, module, 1)
    reward_model = module.rewards[0]
    assert reward_model.model is not None and reward_model.shares_tokenizer
    assert not any(p.requires_grad for p in reward_model.parameters())
    exp = module.buffer.experience
    # every response is scored as finished: EOS appended where the sampler stopped without one
    sequences, mask = append_eos(exp.sequences, exp.attention_mask, module.actor.eos_token_ids)
    expected = reward_model.model.score(sequences, mask)
    torch.testing.assert_close(exp.scores, expected, atol=1e-6, rtol=1e-6)


def test_resume_continues_the_same_trajectory(make, tmp_path):
    full = fit(tmp_path / "full", make(), 3)
    first = fit(tmp_path / "first", make(), 2)
    ckpt = tmp_path / "after2.ckpt"
    first.save_checkpoint(ckpt)
    L.seed_everything(0, verbose=False)  # the run's seed, as the config would set it ...
    torch.rand(1000)  # ... but the global RNG elsewhere in its stream must not matter
    resumed = trainer(tmp_path / "resumed", 3)
    module = make()
    resumed.fit(module, datamodule=datamodule(module.assets), ckpt_path=str(ckpt))
    a = metrics(full).dropna(subset=["reward/mean"]).set_index("epoch")
    b = metrics(resumed).dropna(subset=["reward/mean"]).set_index("epoch")
    for key in ("reward/mean", "rollout/kl", "rollout/response_length"):
        assert a.loc[2, key] == pytest.approx(b.loc[2, key], rel=1e-5, abs=1e-6), key
    steps_a = metrics(full).dropna(subset=["policy/loss"])
    steps_b = metrics(resumed).dropna(subset=["policy/loss"])
    assert steps_a[steps_a.epoch == 2]["policy/loss"].tolist() == pytest.approx(
        steps_b[steps_b.epoch == 2]["policy/loss"].tolist(), rel=1e-4, abs=1e-6
    )


def test_micro_batch_accumulation_gives_the_full_mini_batch_gradient(make, tmp_path):
    module = make()
    fit(tmp_path, module, 1)
    batch = module.buffer.experience.index(slice(0, 8))
    for row, length in enumerate([1, 4, 2, 3, 4, 1, 3, 2]):  # rows of different lengths
        batch.loss_mask[row, length:] = False
        batch.attention_mask[row, batch.sequences.shape[1] - batch.num_actions + length :] = 0

    def grads(micro_size, max_tokens=None):
        actor, critic = copy.deepcopy(module.actor), copy.deepcopy(module.critic)
        total = batch.loss_mask.sum()
        micro_batches = batch.split(micro_size) if max_tokens is None else batch.micro_batches(micro_size, max_tokens)
        for micro in micro_batches:
            loss, _ = ppo_micro_step(actor, critic, micro, module.algorithm, module.kl, 0.1, 1.0)
            (loss * micro.loss_mask.sum() / total).backward()
        return [p.grad.clone() for p in [*actor.parameters(), *critic.parameters()] if p.grad is not None]

    assert len(batch.micro_batches(8, max_tokens=30)) >= 3, "the token budget splits the mini-batch"
    full = grads(8)
    for accumulated in (grads(2), grads(8, max_tokens=30)):  # fixed rows; rows of similar length under a budget
        for f, a in zip(full, accumulated, strict=True):
            torch.testing.assert_close(a, f, atol=1e-6, rtol=1e-5)


def test_generation_settings_override_checkpoint_generation_config(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"])
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.05, top_k=1, top_p=0.1)
    model.save_pretrained(tmp_path / "policy")
    from lit_rlhf.models import Actor, GenerationSettings, load_tokenizer

    tok = load_tokenizer(tiny_assets["policy"])
    actor = Actor.from_pretrained(str(tmp_path / "policy"), tok)
    prompts = tok(["12+34="] * 64, return_tensors="pt")
    out = actor.generate(prompts.input_ids, prompts.attention_mask, GenerationSettings(max_new_tokens=1))
    # the checkpoint's top_k=1 would give one token; temperature 1 over a random model gives many
    assert out.sequences[:, -1].unique().numel() > 3


def test_lora_actor_uses_its_disabled_adapter_as_reference(make, tmp_path):
    module = make(models={"lora": {"rank": 4, "alpha": 8}})
    fit(tmp_path, module, 2)
    assert module.reference is None and module.actor.has_adapter
    exp = module.buffer.experience
    with torch.no_grad(), module.actor.adapter_disabled():
        base = module.actor(exp.sequences, exp.attention_mask, exp.num_actions)
    torch.testing.assert_close(exp.ref_log_probs, base, atol=1e-5, rtol=1e-5)
    assert (exp.old_log_probs - exp.ref_log_probs).abs().max() > 1e-4, "the adapter has moved the policy"


def test_score_settings_penalty_clip_and_normalisation(make, tmp_path):
    eos = 2
    responses = torch.tensor([[5, 6, eos, 0], [5, 6, 7, 8]])  # the second was cut at max_new_tokens
    prompts = torch.tensor([[1, 5, 4, 6]] * 2)
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    gen = GenerationOutput(
        torch.cat([prompts, responses], 1),
        torch.cat([torch.ones_like(prompts), loss_mask.long()], 1),
        loss_mask,
        torch.zeros(2, 4),
        torch.tensor([True, False]),  # the second was cut at max_new_tokens
    )

    class Fixed(PPOModule):
        def compute_reward(self, prompts, responses):
            return torch.tensor([3.0, 0.5])

    module = make(Fixed, algorithm={"missing_eos_penalty": 1.0, "reward_clip": 2.0})
    module.configure_model()
    # missing-EOS penalty first (0.5 - 1 = -0.5), then clipping to [-2, 2] (3 -> 2)
    scored = module.score_responses(gen, ["p", "p"], {})
    torch.testing.assert_close(scored.scores, torch.tensor([2.0, -0.5]))
    torch.testing.assert_close(scored.parts["score"], torch.tensor([3.0, 0.5]))  # before shaping

    import json
    import shutil

    stored = tmp_path / "rm_with_statistics"  # normalize needs the mean/std a trained reward model stores
    shutil.copytree(make().assets["reward"], stored)
    config = json.loads((stored / "config.json").read_text())
    (stored / "config.json").write_text(json.dumps({**config, "reward_mean": 0.0, "reward_std": 1.0}))
    rm_module = make(PPOModule, rewards=[RewardModel(str(stored), normalize=True)])
    rm_module.configure_model()
    reward_model = rm_module.rewards[0].model
    reward_model.set_normalization(0.25, 4.0)
    raw = reward_model.score(*append_eos(gen.sequences, gen.attention_mask, rm_module.actor.eos_token_ids))
    torch.testing.assert_close(rm_module.score_responses(gen, ["p", "p"], {}).scores, (raw - 0.25) / 4.0)


def test_adaptive_kl_controller_moves_the_coefficient_during_training(make, tmp_path):
    module = make(kl={"target": 1000.0, "horizon": 100, "coef": 0.1})
    t = fit(tmp_path, module, 3)
    coefs = metrics(t)["rollout/kl_coef"].dropna().tolist()
    # KL far below target: error clipped to -0.2, 16 samples per rollout -> beta *= 1 - 0.2 * 16 / 100
    assert coefs == pytest.approx([0.1, 0.1 * 0.968, 0.1 * 0.968**2], rel=1e-6)


def test_recompute_old_log_probs_uses_a_full_forward(make, tmp_path):
    module = make(rollout={"recompute_old_log_probs": True})
    fit(tmp_path, module, 1)
    exp = module.buffer.experience
    before_update = make(rollout={"recompute_old_log_probs": True})  # same seed, same weights as the rollout saw
    before_update.configure_model()
    with torch.no_grad():
        forward = before_update.actor(exp.sequences, exp.attention_mask, exp.num_actions, 1.0)
    assert torch.equal(exp.old_log_probs, forward)


def test_padding_free_rollout_and_updates_equal_the_padded_ones(make, tmp_path):
    runs = {}
    for packed in (False, True):
        module = make(
            cls=PPOModule,
            rewards=[RewardModel(make().assets["reward"])],
            generation={"max_new_tokens": 6},
            models={"padding_free": packed},
        )
        runs[packed] = (module, metrics(fit(tmp_path / str(packed), module, 1)))
    (padded, padded_log), (packed, packed_log) = runs[False], runs[True]
    a, b = padded.buffer.experience, packed.buffer.experience
    assert torch.equal(a.sequences, b.sequences)  # generation is untouched
    assert not a.attention_mask.all(), "the rollout must contain padding for this test to mean anything"
    mask = a.loss_mask
    for field in ("ref_log_probs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, field)[mask], getattr(a, field)[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-5)
    for key in ("policy/loss", "critic/loss", "policy/approx_kl"):
        got, want = packed_log[key].dropna().to_numpy(), padded_log[key].dropna().to_numpy()
        assert len(got) == len(want) == 4
        assert abs(got - want).max() < 1e-4, (key, got, want)
