"""Reliability: nothing silent, nothing lost. Faults are injected into real runs.

Checkpoint faults (full disk, damage, payloads, SIGKILL) are in test_checkpoint_faults.py.
"""

import json
import os

import lightning as L
import pandas as pd
import pytest
import torch

import lit_rlhf.modules.ppo as ppo_module
from lit_rlhf import PPOModule, PromptDataModule
from lit_rlhf.precision import AutoPrecision
from lit_rlhf.rewards import RewardFunction, RewardModel
from tests.helpers import SevensPPO, datamodule, small_module, trainer
from tests.test_checkpoint_faults import fit_with_checkpoints

# --- the divergence guard -----------------------------------------------------------------------


def poison(monkeypatch, calls: set[int]):
    """Make the loss of the given ppo_micro_step calls NaN (as a blown-up learning rate would)."""
    real, count = ppo_module.ppo_micro_step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if count[0] in calls else (loss, stats)

    monkeypatch.setattr(ppo_module, "ppo_micro_step", step)


def test_a_nan_step_is_skipped_with_the_weights_untouched(tiny_assets, tmp_path, monkeypatch):
    poison(monkeypatch, {5, 6})  # step 3 (two micro-batches per step) of rollout 0
    snapshots = []

    class Weights(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in module.actor.state_dict().items()})

    module = small_module(tiny_assets, SevensPPO)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, 1, [Weights()])
    t.fit(module, datamodule=datamodule(tiny_assets))
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1]), "step 3 changed nothing"
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2]), "step 4 trained again"
    logged = pd.read_csv(os.path.join(t.log_dir, "metrics.csv")).dropna(subset=["policy/skipped_steps"])
    assert logged["policy/skipped_steps"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert all(torch.isfinite(v).all() for v in module.actor.state_dict().values())


def test_nan_steps_in_a_row_stop_the_run_naming_the_cause(tiny_assets, tmp_path, monkeypatch):
    poison(monkeypatch, set(range(9, 100)))  # from rollout 1's first step on
    module = small_module(tiny_assets, SevensPPO, optim={"max_nonfinite_steps": 2})
    with pytest.raises(FloatingPointError) as err:
        fit_with_checkpoints(tiny_assets, tmp_path, epochs=3, module=module)
    message = str(err.value)
    assert "policy/grad_norm was nan at rollout 1, mini-batch 1; 2 optimizer steps in a row" in message
    assert "Last good checkpoint: " in message and "epoch=0" in message


def test_non_finite_weights_stop_the_rollout_before_sampling(tiny_assets, tmp_path):
    module = small_module(tiny_assets, SevensPPO)
    module.configure_model()
    with torch.no_grad():
        next(module.actor.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are not finite before sampling"):
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))


# --- wrong model in a role ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory, tiny_assets):
    """A reward model with a different (BPE) tokenizer."""
    from lit_rlhf.tasks import save_tiny_models, tiny_llama_config, train_tokenizer

    tok = train_tokenizer(["12+34=46", "7-3=4"] * 50, kind="bpe", vocab_size=300)
    return save_tiny_models(str(tmp_path_factory.mktemp("bpe")), tok, tiny_llama_config(tok, 32, 1, 4))


@pytest.mark.parametrize(
    "case,message",
    [
        ("classifier as actor", "models.actor_path .* is a LlamaForSequenceClassification without the 'lm_head'"),
        ("causal LM as reward model", "reward model reward_model .* is a LlamaForCausalLM without the 'score' head"),
        ("critic without a head", "the critic's starting point .* without the 'score' head .*new_value_head: true"),
        ("critic with another vocabulary", "the critic would start from .*whose tokenizer differs from the actor's"),
    ],
)
def test_a_model_in_the_wrong_role_is_named_before_training(tiny_assets, other_vocabulary, tmp_path, case, message):
    policy, reward = tiny_assets["policy"], tiny_assets["reward"]
    rewards, models = [RewardFunction(lambda prompts, responses: [0.0] * len(prompts), name="zero")], {}
    if case == "classifier as actor":
        models = {"actor_path": reward, "critic_path": reward}
    elif case == "causal LM as reward model":
        rewards, models = [RewardModel(policy)], {"critic_path": reward}
    elif case == "critic without a head":
        models = {"new_value_head": False}
    else:  # the critic defaults to the first reward model's path: here one with a BPE tokenizer
        rewards, models = [RewardModel(other_vocabulary["reward"])], {"new_value_head": False}
    with pytest.raises(ValueError, match=message):
        module = small_module(tiny_assets, PPOModule, rewards=rewards, models=models)
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    if case == "critic with another vocabulary":
        assert module.actor is None, "caught in setup, before any model loads"


def test_the_critic_defaults_to_the_actor_with_a_new_head_and_a_headless_critic_path_fails_at_once(tiny_assets):
    from lit_rlhf.modules.ppo_setup import build_policy

    zero = RewardFunction(lambda prompts, responses: [0.0] * len(prompts), name="zero")
    module = small_module(tiny_assets, PPOModule, rewards=[zero], models={"new_value_head": None})
    assert module.critic_path == tiny_assets["policy"]
    critic = build_policy(module.models, module.tokenizer, True, module.critic_path).critic
    assert critic is not None and critic.model.score.weight.shape[0] == 1  # a new scalar head on the actor
    with pytest.raises(ValueError, match="models.critic_path .* without the 'score' head .*new_value_head: true"):
        small_module(
            tiny_assets,
            PPOModule,
            rewards=[zero],
            models={"critic_path": tiny_assets["policy"], "new_value_head": None},
        )


# --- settings and data that used to run silently wrong ------------------------------------------


@pytest.mark.parametrize(
    "groups,message",
    [
        ({"algorithm": {"micro_batch_size": -4}}, "algorithm.micro_batch_size must be >= 1, got -4"),
        ({"algorithm": {"lam": 5.0}}, "algorithm.lam must be in \\[0, 1\\], got 5.0"),
        ({"algorithm": {"gamma": -1.0}}, "algorithm.gamma must be in \\[0, 1\\], got -1.0"),
        ({"kl": {"coef": -0.1}}, "kl.coef must be >= 0, got -0.1"),
        ({"algorithm": {"dual_clip": 0.5}}, "algorithm.dual_clip must be > 1"),
        ({"rollout": {"rollout_batch_size": 0}}, "rollout.rollout_batch_size must be >= 1, got 0"),
        (
            {
                "algorithm": {"advantage_estimator": "grpo"},
                "generation": {"temperature": 0.0, "n_samples_per_prompt": 2},
            },
            "generation.temperature=0 samples greedily",
        ),
    ],
)
def test_settings_that_used_to_train_nothing_are_refused(tiny_assets, groups, message):
    with pytest.raises(ValueError, match=message):
        small_module(tiny_assets, SevensPPO, **groups)


@pytest.mark.parametrize(
    "data,records,message",
    [
        ({"max_prompt_len": 0}, None, "data.max_prompt_len must be >= 1, got 0"),
        ({"max_prompt_len": -3}, None, "data.max_prompt_len must be >= 1, got -3"),
        ({"val_batch_size": 0}, None, "data.val_batch_size must be >= 1, got 0"),
        ({}, [{"prompt": None}], "row 1, field 'prompt': expected a string, got NoneType None"),
        ({}, [{"prompt": "  "}], "row 1, field 'prompt': the prompt is empty"),
        ({"max_prompt_len": 1024}, [{"prompt": "1" * 300}], "exceed the actor's position range \\(256"),
    ],
)
def test_bad_data_is_named_before_any_model_loads(tiny_assets, tmp_path, data, records, message):
    path = tiny_assets["prompts"]
    if records is not None:
        path = str(tmp_path / "prompts.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records * 20)
    module = small_module(tiny_assets, SevensPPO)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, 1).fit(module, datamodule=PromptDataModule(path, **data))
    assert module.actor is None


def test_an_unwritable_export_dir_fails_before_training(tiny_assets, tmp_path):
    (tmp_path / "a_file").write_text("")
    module = small_module(tiny_assets, SevensPPO, export_dir=str(tmp_path / "a_file" / "export"))
    with pytest.raises(PermissionError, match="export_dir .*a_file/export' cannot be written"):
        trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    assert module.actor is None


def test_an_export_that_fails_half_way_leaves_the_previous_one(tiny_assets, tmp_path, monkeypatch):
    module = small_module(tiny_assets, SevensPPO, export_dir=str(tmp_path / "export"))
    trainer(tmp_path, 1).fit(module, datamodule=datamodule(tiny_assets))
    before = (tmp_path / "export" / "actor" / "model.safetensors").read_bytes()
    monkeypatch.setattr(
        type(module.critic), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        module.export_pretrained(str(tmp_path / "export"))
    assert (tmp_path / "export" / "actor" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "export" / "critic" / "config.json").exists() and not (tmp_path / "export.partial").exists()


# --- precision that fits every CPU ---------------------------------------------------------------


def test_precision_follows_what_the_cpu_does_fast(monkeypatch):
    import lit_rlhf.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert AutoPrecision(device="cpu").precision == "32-true", "AVX2 only: fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert AutoPrecision(device="cpu").precision == "bf16-mixed"
    assert AutoPrecision(mode="32-true", device="cpu").precision == "32-true", "a setting forces fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert AutoPrecision(mode="bf16-mixed", device="cpu").precision == "bf16-mixed", "or bf16"
    with AutoPrecision(device="cpu").forward_context():
        assert not torch.is_autocast_cpu_enabled()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    with AutoPrecision(device="cpu").forward_context():
        assert torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16
