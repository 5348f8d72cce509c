"""The rollout's numbers stay what they were: three rollouts of a small PPO (GAE) and GRPO fit, and
a DPO fit, against ``rollouts.json`` (recorded by ``record.py`` from the code before the rollout
moved into the module).

The recording runs in a subprocess on one thread with MKL's conditional numerical reproducibility
(``MKL_CBWR=COMPATIBLE``) and ATen's baseline kernels (``ATEN_CPU_CAPABILITY=default``), so an
AVX2 machine and an AVX512 one compute the same bits (checked by forcing MKL's AVX2 path).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
REPRODUCIBLE = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
INTEGER_FIELDS = ("sequences", "mask")
ROW_FIELDS = ("scores",)  # the others are per token, [B, A]: compared where the trainable mask is 1 (elsewhere
# they mean nothing: the old sampler left the log-prob of the pad it wrote after EOS there, the packer writes 0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "now.json"
    env = {**os.environ, **REPRODUCIBLE, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-m", "tests.golden.record", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        now = json.load(f)
    with open(os.path.join(HERE, "rollouts.json")) as f:
        return json.load(f), now


def close(name: str, expected, actual, mask=None) -> None:
    if expected is None or actual is None:
        assert expected is actual, f"{name}: {expected!r} vs {actual!r}"
        return
    expected, actual = torch.tensor(expected, dtype=torch.float64), torch.tensor(actual, dtype=torch.float64)
    if mask is not None:
        mask = torch.tensor(mask, dtype=torch.bool)
        expected, actual = expected[mask], actual[mask]
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("run", ["ppo_gae", "grpo"])
def test_the_first_three_rollouts_and_their_updates_are_reproduced(recorded, run):
    golden, now = recorded
    assert len(now[run]["rollouts"]) == len(golden[run]["rollouts"]) == 3
    for k, (expected, actual) in enumerate(zip(golden[run]["rollouts"], now[run]["rollouts"], strict=True)):
        for field in INTEGER_FIELDS:
            assert actual[field] == expected[field], f"{run} rollout {k}: {field} differ"
        for field in expected.keys() - set(INTEGER_FIELDS):
            mask = None if field in ROW_FIELDS else expected["mask"]
            close(f"{run} rollout {k} {field}", expected[field], actual[field], mask)
    assert now[run]["steps"].keys() == golden[run]["steps"].keys()
    for metric, values in golden[run]["steps"].items():
        close(f"{run} {metric}", values, now[run]["steps"][metric])


def test_a_dpo_fit_is_reproduced(recorded):
    golden, now = recorded
    assert now["dpo"]["steps"].keys() == golden["dpo"]["steps"].keys()
    for metric, values in golden["dpo"]["steps"].items():
        close(f"dpo {metric}", values, now["dpo"]["steps"][metric])


def test_the_fixture_covers_masks_with_holes_at_the_end_and_every_field(recorded):
    golden, _ = recorded
    masks = [row for rollout in golden["grpo"]["rollouts"] for row in rollout["mask"]]
    assert any(0 in row for row in masks) and any(0 not in row for row in masks)  # early EOS and full rows
    gae = golden["ppo_gae"]["rollouts"][0]
    assert all(gae[field] is not None for field in ("values", "ref_log_probs", "returns"))
    assert golden["ppo_gae"]["steps"]["critic/loss"] and golden["grpo"]["steps"]["policy/kl_loss"]
