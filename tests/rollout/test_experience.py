"""ExperienceBuffer order and reuse; KL controllers; global whitening across ranks."""

import pytest
import torch

from lit_rlhf import functional as F
from lit_rlhf.rollout import AdaptiveKLController, ExperienceBuffer, KLController
from lit_rlhf.rollout.advantages import global_whiten


def test_buffer_walks_every_experience_ppo_epochs_times_in_shuffled_mini_batches():
    buffer = ExperienceBuffer(size=12, mini_batch_size=4, ppo_epochs=3, seed=5)
    batches = list(buffer)
    assert len(batches) == len(buffer) == 9
    assert all(len(b) == 4 for b in batches)
    counts = torch.bincount(torch.cat(batches), minlength=12)
    assert counts.tolist() == [3] * 12
    for k in range(3):  # each pass is a permutation
        assert sorted(torch.cat(batches[3 * k : 3 * k + 3]).tolist()) == list(range(12))
    assert torch.cat(batches).tolist() != list(range(12)) * 3


def test_buffer_order_is_a_function_of_seed_and_epoch():
    a, b = ExperienceBuffer(8, 4, 1, seed=1), ExperienceBuffer(8, 4, 1, seed=1)
    a.set_rollout(3)
    b.set_rollout(3)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    b.set_rollout(4)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]


def test_buffer_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="mini_batch_size"):
        ExperienceBuffer(10, 4)
    with pytest.raises(RuntimeError, match="empty"):
        ExperienceBuffer(8, 4).get(torch.tensor([0]))


def test_global_whiten_single_process_equals_masked_whiten():
    x, mask = torch.randn(4, 6), torch.rand(4, 6) > 0.3
    torch.testing.assert_close(global_whiten(x, mask), F.masked_whiten(x, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        global_whiten(x, mask, shift_mean=False), F.masked_whiten(x, mask, shift_mean=False), atol=1e-5, rtol=1e-5
    )


def test_global_whiten_two_ranks_equal_one_process():
    x, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]

    def stats(v, m):
        v = torch.where(m, v, 0.0)
        return torch.stack([v.sum(), v.square().sum(), m.sum().float()])

    total = stats(*halves[0]) + stats(*halves[1])  # what an all-reduce sum returns on each rank
    per_rank = [global_whiten(v, m, all_reduce=lambda _: total) for v, m in halves]
    torch.testing.assert_close(torch.cat(per_rank), F.masked_whiten(x, mask), atol=1e-5, rtol=1e-5)


def test_kl_controllers():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    adaptive.update(9.0, 100)  # error clip(9/6 - 1, ±.2) = .2 -> beta * (1 + .2 * 100/1000)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(3.0, 100)  # error -.5 -> -.2
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
    restored = AdaptiveKLController(0.5, 6.0, 1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
