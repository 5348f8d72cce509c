"""Optimizers and learning-rate schedules shared by the training modules."""

import pytest
import torch

from lit_rlhf.models import Actor
from lit_rlhf.modules.schedule import adamw_kernel, make_optimizer
from lit_rlhf.modules.schedule import cosine_with_warmup as lr_schedule


def test_lr_schedule_warmup_then_cosine():
    f = lr_schedule(warmup=2, decay="cosine", total=6)
    assert [round(f(s), 6) for s in range(7)] == [
        0.5,
        1.0,
        1.0,
        round(0.5 * (1 + 0.7071067811865476), 6),
        0.5,
        round(0.5 * (1 - 0.7071067811865476), 6),
        0.0,
    ]
    assert lr_schedule(0, "constant", None)(100) == 1.0
    with pytest.raises(ValueError, match="max_epochs"):
        lr_schedule(0, "cosine", None)


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
