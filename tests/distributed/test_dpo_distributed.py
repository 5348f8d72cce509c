"""DPO under DDP and FSDP2 for real: two CPU processes (gloo) against one process with the combined batch."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.distributed.test_distributed import one_step_per_strategy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_step(tiny_assets, tmp_path_factory):
    """One DPO step on 8 pairs: one process, and two ranks of 4 pairs each (DDP, FSDP2)."""
    return one_step_per_strategy("dpo", tiny_assets, tmp_path_factory.mktemp("dpo_step"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_dpo_step_on_two_ranks_equals_one_process_with_both_halves(dpo_step, tiny_assets, strategy):
    single, distributed = dpo_step["single"][0], dpo_step[strategy][0]
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets["policy"]).state_dict()
    moved = max((single[f"actor.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"
    # every rank's reference cache holds all 16 answer rows (each rank scored half, then all-gathered)
    assert int(distributed["cached_rows"]) == int(single["cached_rows"]) == 16
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_export_at_the_end_of_fit_is_the_trained_policy(dpo_step, strategy):
    state, export_dir = dpo_step[strategy]
    exported = AutoModelForCausalLM.from_pretrained(export_dir).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, state[f"actor.{key}"], msg=key)
