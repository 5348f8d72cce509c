"""The settings groups: ranges and interactions named by field, dict input, and one way to build them."""

import ast
import dataclasses
import glob
import os

import pytest

from lit_rlhf import settings as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = [
    S.LoraSettings,
    S.LoadSettings,
    S.PPOModelSettings,
    S.ModelSettings,
    S.GenerationSettings,
    S.RolloutSettings,
    S.AlgorithmSettings,
    S.KLSettings,
    S.OptimizerSettings,
    S.PPOOptimSettings,
]


@pytest.mark.parametrize(
    "group,fields,message",
    [
        (S.AlgorithmSettings, {"lam": 5}, "algorithm.lam must be in \\[0, 1\\], got 5"),
        (S.AlgorithmSettings, {"gamma": -1}, "algorithm.gamma must be in \\[0, 1\\], got -1"),
        (S.AlgorithmSettings, {"micro_batch_size": -4}, "algorithm.micro_batch_size must be >= 1, got -4"),
        (S.AlgorithmSettings, {"mini_batch_size": 0}, "algorithm.mini_batch_size must be >= 1, got 0"),
        (S.AlgorithmSettings, {"dual_clip": 0.5}, "algorithm.dual_clip must be > 1"),
        (S.AlgorithmSettings, {"clip_eps": 0.0}, "algorithm.clip_eps must be in \\(0, 1\\)"),
        (S.AlgorithmSettings, {"ppo_epochs": 0}, "algorithm.ppo_epochs must be >= 1"),
        (S.AlgorithmSettings, {"mini_batch_size": 6, "micro_batch_size": 4}, "multiple of algorithm.micro_batch_size"),
        (S.KLSettings, {"coef": -0.1}, "kl.coef must be >= 0, got -0.1"),
        (S.KLSettings, {"penalty": "loss"}, "kl.penalty='loss' with kl.estimator='k1'"),
        (S.KLSettings, {"target": 0.0}, "kl.target must be > 0"),
        (S.GenerationSettings, {"max_new_tokens": 0}, "generation.max_new_tokens must be >= 1"),
        (S.GenerationSettings, {"top_p": 0.0}, "generation.top_p must be in \\(0, 1\\]"),
        (S.GenerationSettings, {"suppress_token_ids": [-1]}, "generation.suppress_token_ids must be ids >= 0"),
        (S.RolloutSettings, {"rollout_batch_size": 0}, "rollout.rollout_batch_size must be >= 1"),
        (S.RolloutSettings, {"score_micro_batch_size": -1}, "rollout.score_micro_batch_size must be >= 1"),
        (S.LoraSettings, {"rank": -1}, "lora.rank must be >= 0"),
        (S.LoraSettings, {"dropout": 1.0}, "lora.dropout must be in \\[0, 1\\)"),
        (S.PPOModelSettings, {"actor_path": ""}, "models.actor_path must be a model directory or hub id"),
        (S.PPOModelSettings, {"actor_path": "a", "load_in_4bit": True}, "set models.lora.rank > 0"),
        (S.OptimizerSettings, {"max_grad_norm": 0.0}, "optim.max_grad_norm must be > 0"),
        (S.OptimizerSettings, {"warmup_steps": -1}, "optim.warmup_steps must be >= 0"),
        (S.OptimizerSettings, {"lr_scheduler": "poly"}, "unknown optim.lr_scheduler 'poly'; valid: constant, "),
    ],
)
def test_a_bad_field_is_named(group, fields, message):
    with pytest.raises(ValueError, match=message):
        group(**fields)


def test_interactions_resolve_next_to_their_fields():
    assert S.AlgorithmSettings().whiten and not S.AlgorithmSettings(advantage_estimator="grpo").whiten
    assert S.AlgorithmSettings(advantage_estimator="rloo").whiten
    assert not S.AlgorithmSettings(advantage_estimator="rloo", whiten_advantages=False).whiten
    assert S.AlgorithmSettings().uses_critic and not S.AlgorithmSettings(advantage_estimator="grpo").uses_critic
    generation = S.GenerationSettings(temperature=0.7, val_temperature=0.0, n_samples_per_prompt=4)
    assert generation.for_validation().temperature == 0.0 and generation.for_validation().n_samples_per_prompt == 1
    assert generation.for_validation().scoring_temperature == 1.0 and generation.scoring_temperature == 0.7
    frozen = S.PPOModelSettings(actor_path="a", lora={"rank": 4}, gradient_checkpointing=True).frozen()
    assert not frozen.lora.enabled and not frozen.gradient_checkpointing


def test_groups_from_dicts_and_unknown_fields():
    models = S.as_group(S.PPOModelSettings, {"actor_path": "a", "lora": {"rank": 8}})
    assert models.lora == S.LoraSettings(rank=8)
    optim = S.as_group(S.PPOOptimSettings, {"actor": {"max_grad_norm": 0.5}})
    assert optim.actor.max_grad_norm == 0.5 and optim.critic == S.OptimizerSettings()
    with pytest.raises(TypeError, match="unknown KLSettings field\\(s\\) \\['kl_coef'\\]; valid: coef"):
        S.as_group(S.KLSettings, {"kl_coef": 0.1})


def test_optimizer_round_trips_through_plain_data():
    import torch

    settings = S.OptimizerSettings(optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.25}})
    plain = S.to_plain(settings)
    assert plain["optimizer"] == {"class_path": "torch.optim.sgd.SGD", "init_args": {"lr": 0.25}}
    rebuilt = S.OptimizerSettings(**plain)
    optimizer = rebuilt.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.25


def test_every_field_has_a_help_line():
    """Each field's docstring is its --help text: none may be missing."""
    import inspect

    for group in GROUPS:
        source = inspect.getsource(group)
        tree = ast.parse(source.lstrip() if source.startswith(" ") else source)
        body = tree.body[0].body
        documented = {
            node.target.id
            for node, after in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(getattr(after, "value", None), ast.Constant)
        }
        own = {f.name for f in dataclasses.fields(group)} & {n.target.id for n in body if isinstance(n, ast.AnnAssign)}
        assert own <= documented, (group.__name__, own - documented)


def test_no_positional_settings_and_no_untyped_settings_in_the_package():
    """Settings objects are built by keyword; no function takes the whole config as ``Any``."""
    names = {g.__name__ for g in GROUPS}
    for path in glob.glob(os.path.join(ROOT, "lit_rlhf", "**", "*.py"), recursive=True):
        with open(path) as f:
            source = f.read()
        assert "hp: Any" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in names:
                assert not node.args, f"{path}:{node.lineno} builds a settings object positionally"
    with pytest.raises(TypeError):
        S.KLSettings(0.1)  # kw_only: positional construction is impossible
