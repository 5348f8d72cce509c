"""Reference-free runs (kl.coef: 0): no reference model is built and no reference forward runs."""

import logging

import lightning as L
import pandas as pd
import pytest
import torch

from lit_rlhf.models import Actor
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.settings import KLSettings
from tests.helpers import SevensPPO, datamodule, small_module, trainer


def fit(tmp_path, module, assets, epochs, **kwargs):
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs, **kwargs)
    t.fit(module, datamodule=datamodule(assets))
    return t, pd.read_csv(f"{t.logger.log_dir}/metrics.csv")


@pytest.fixture
def no_reference_forward(monkeypatch):
    """Any reference forward (a reference model, or the actor with its adapter disabled) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a reference forward ran in a reference-free run")

    monkeypatch.setattr(PolicySet, "reference_log_probs", refuse)
    monkeypatch.setattr(PolicySet, "reference_policy", refuse)
    monkeypatch.setattr(Actor, "adapter_disabled", refuse)


def test_kl_coef_zero_loads_no_reference_and_trains_on_the_score_alone(
    tiny_assets, tmp_path, monkeypatch, no_reference_forward
):
    loaded = []
    original = Actor.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loaded.append(kwargs.get("role"))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Actor, "from_pretrained", classmethod(counting))
    module = small_module(tiny_assets, SevensPPO, kl={"coef": 0.0})
    _, log = fit(tmp_path, module, tiny_assets, 3, limit_val_batches=1)
    assert module.reference is None and loaded == ["models.actor_path"]  # the actor only, no frozen copy
    exp = module.buffer.experience
    assert exp.ref_log_probs is None
    assert torch.equal(exp.kl, torch.zeros_like(exp.kl))
    # no KL in the token rewards: each row's rewards sum to its score (it sits on the last valid token)
    torch.testing.assert_close(exp.rewards.sum(-1), exp.scores)
    assert "rollout/kl" not in log and "val/kl" not in log and "val/reward" in log
    assert (log["rollout/kl_coef"].dropna() == 0).all()
    rewards = log["reward/mean"].dropna().tolist()
    assert rewards[-1] > rewards[0], rewards


def test_kl_coef_zero_with_lora_never_disables_the_adapter(tiny_assets, tmp_path, no_reference_forward):
    module = small_module(
        tiny_assets,
        SevensPPO,
        kl={"coef": 0.0, "penalty": "loss", "estimator": "k3"},
        algorithm={"advantage_estimator": "grpo"},
        generation={"n_samples_per_prompt": 4},
        rollout={"rollout_batch_size": 4},
        models={"lora": {"rank": 4, "alpha": 8}},
    )
    _, log = fit(tmp_path, module, tiny_assets, 2, limit_val_batches=1)
    assert module.reference is None and module.buffer.experience.ref_log_probs is None
    assert "policy/kl_loss" not in log and "policy/loss" in log


def test_a_reference_path_with_kl_coef_zero_is_not_loaded_and_says_so(tiny_assets, other_policy, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_rlhf"):
        module = small_module(tiny_assets, SevensPPO, kl={"coef": 0.0}, models={"reference_path": other_policy})
    assert "models.reference_path" in caplog.text and "kl.coef=0" in caplog.text
    module.configure_model()
    assert module.reference is None


def test_positive_kl_coef_still_builds_the_reference(tiny_assets):
    module = small_module(tiny_assets, SevensPPO, kl={"coef": 0.01})
    module.configure_model()
    assert module.reference is not None and KLSettings(coef=0.01).uses_reference
    assert not KLSettings(coef=0.0).uses_reference


def test_an_adaptive_controller_cannot_start_from_zero():
    with pytest.raises(ValueError, match=r"kl.target with kl.coef=0.*kl.coef > 0"):
        KLSettings(coef=0.0, target=6.0)


def test_suppressed_ids_outside_the_vocabulary_fail_before_any_model_loads(tiny_assets, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the settings were checked")

    monkeypatch.setattr(Actor, "from_pretrained", refuse)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_assets["policy"]).vocab_size
    with pytest.raises(ValueError, match=rf"suppress_token_ids \[{vocab}\] are outside the actor's vocabulary"):
        small_module(tiny_assets, SevensPPO, generation={"suppress_token_ids": [3, vocab]})
