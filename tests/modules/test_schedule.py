"""Optimizers and learning-rate schedules shared by the training modules."""

import math

import pytest
import torch

from lit_rlhf.models import Actor
from lit_rlhf.modules.schedule import adamw_kernel, make_optimizer, make_scheduler, ppo_total_steps, warmup_steps
from lit_rlhf.settings import OptimizerSettings

PEAK = 0.1


def learning_rates(total: int | None, steps: int, **settings) -> list[float]:
    """The learning rate of each of the first ``steps`` optimizer steps (read before the step, as PPO logs it)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = make_scheduler(optimizer, OptimizerSettings(**settings), total)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def cosine(progress: float, floor: float = 0.0) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # warm-up 2 of 10 steps: step s < 2 is s/2; after it the remaining 8 steps decay
        ({"lr_scheduler": "linear", "warmup_steps": 2}, [0, 0.5] + [(10 - s) / 8 for s in range(2, 10)]),
        ({"lr_scheduler": "cosine", "warmup_steps": 2}, [0, 0.5] + [cosine((s - 2) / 8) for s in range(2, 10)]),
        (
            {"lr_scheduler": "cosine_with_min_lr", "warmup_steps": 2, "min_lr_ratio": 0.2},
            [0, 0.5] + [cosine((s - 2) / 8, floor=0.2) for s in range(2, 10)],
        ),
        # the default floor is 0.1 of the peak
        ({"lr_scheduler": "cosine_with_min_lr"}, [cosine(s / 10, floor=0.1) for s in range(10)]),
        ({"lr_scheduler": "constant_with_warmup", "warmup_steps": 4}, [0, 0.25, 0.5, 0.75] + [1.0] * 6),
        ({"lr_scheduler": "constant"}, [1.0] * 10),
        # warmup_ratio 0.25 of 10 steps = ceil(2.5) = 3 warm-up steps
        ({"lr_scheduler": "linear", "warmup_ratio": 0.25}, [0, 1 / 3, 2 / 3] + [(10 - s) / 7 for s in range(3, 10)]),
    ],
)
def test_each_schedule_follows_its_formula(settings, expected):
    rates = learning_rates(10, 10, **settings)
    assert rates == pytest.approx([PEAK * m for m in expected], abs=1e-9)


def test_the_default_keeps_its_warmup_then_constant_on_an_unbounded_run():
    assert OptimizerSettings().lr_scheduler == "constant_with_warmup"
    assert learning_rates(None, 5, warmup_steps=2) == pytest.approx([0, 0.05, 0.1, 0.1, 0.1])
    assert learning_rates(float("inf"), 3) == pytest.approx([0.1] * 3)


def test_warmup_ratio_resolves_against_the_runs_optimizer_steps():
    assert warmup_steps(OptimizerSettings(warmup_ratio=0.1), 95) == 10  # ceil(9.5), as transformers rounds
    assert warmup_steps(OptimizerSettings(warmup_ratio=0.1), 100) == 10
    assert warmup_steps(OptimizerSettings(warmup_steps=7), None) == 7
    with pytest.raises(ValueError, match="optim.warmup_ratio needs a finite run length.*max_steps"):
        warmup_steps(OptimizerSettings(warmup_ratio=0.1), float("inf"))


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_min_lr"])
def test_a_decaying_schedule_needs_a_run_length(name):
    with pytest.raises(ValueError, match=f"optim.lr_scheduler='{name}' decays .*trainer.max_epochs"):
        learning_rates(None, 1, lr_scheduler=name)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"warmup_ratio": 1.0}, "optim.warmup_ratio must be in \\[0, 1\\), got 1.0"),
        ({"warmup_ratio": -0.1}, "optim.warmup_ratio must be in \\[0, 1\\)"),
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "optim.warmup_steps and optim.warmup_ratio are both set"),
        ({"lr_scheduler": "constant", "warmup_steps": 5}, "optim.lr_scheduler='constant' has no warm-up"),
        ({"lr_scheduler": "cosine", "min_lr_ratio": 0.1}, "optim.min_lr_ratio is read only by .*cosine_with_min_lr"),
        ({"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 1.5}, "optim.min_lr_ratio must be in \\[0, 1\\]"),
        ({"lr_scheduler": "cosine_decay"}, "unknown optim.lr_scheduler 'cosine_decay'; valid: constant, "),
    ],
)
def test_a_bad_schedule_setting_names_its_field(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSettings(**fields)


def test_ppo_total_steps_counts_each_optimizer():
    # 3 epochs of 4 mini-batches; max_steps is shared by the actor's and the critic's optimizer
    assert ppo_total_steps(3, -1, 4, 2) == 12
    assert ppo_total_steps(-1, 10, 4, 2) == 5
    assert ppo_total_steps(3, 10, 4, 1) == 10
    assert ppo_total_steps(None, -1, 4, 1) is None


def test_default_adamw_is_fused_and_steps_like_foreach(tiny_paths, tokenizer):
    models = [Actor.from_pretrained(tiny_paths["policy"], tokenizer) for _ in range(2)]
    fused = make_optimizer(None, models[0], default_lr=1e-2)
    foreach = torch.optim.AdamW(models[1].parameters(), lr=1e-2, foreach=True)
    assert fused.defaults["fused"] is True
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, optimizer in zip(models, (fused, foreach), strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # three Adam steps of lr 1e-2 move every weight by about 3e-2: the comparison is not vacuous
    initial = Actor.from_pretrained(tiny_paths["policy"], tokenizer)
    moved = [(a - b).abs().mean() for a, b in zip(models[0].parameters(), initial.parameters(), strict=True)]
    assert min(moved) > 1e-2
    # parameters the fused kernel does not take fall back to foreach
    assert adamw_kernel([torch.zeros(2, dtype=torch.long)]) == {"foreach": True}
