"""The embedded tool-use task with VLLMEngine: GRPO with the calculator learns as it does with the
native sampler, and the engine's log-probs of the sampled turns are the trainer's."""

import pandas as pd
import pytest

from lit_rlhf.tasks import tool_use
from tests.tasks.tool_kit import build_tool_sft, grpo_args, train

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = [
    "--model.init_args.rollout.engine",
    '{"class_path": "lit_rlhf.rollout.VLLMEngine", "init_args": {"kv_cache_gib": 0.25, "max_num_seqs": 128}}',
]


@pytest.fixture(scope="module")
def tool_sft(tmp_path_factory):
    pytest.importorskip("vllm")
    return build_tool_sft(tmp_path_factory.mktemp("tools"))


def test_grpo_with_the_calculator_learns_with_the_engine_like_the_native_sampler(tool_sft, tmp_path):
    results = {}
    for name, extra in (("native", []), ("vllm", VLLM)):
        root = tmp_path / name
        train(grpo_args(tool_sft, root, 10, extra), tmp_path)
        results[name] = (tool_use.held_out(str(root / "version_0" / "metrics.csv")), root / "version_0")
    print({name: points for name, (points, _) in results.items()})
    for name, (points, _) in results.items():
        before, after = points[0], points[-1]
        assert after["tool_call_rate"] > before["tool_call_rate"] + 0.15, (name, points)
        assert after["accuracy"] > before["accuracy"] + 0.05, (name, points)
    native, vllm = results["native"][0][-1], results["vllm"][0][-1]
    assert abs(native["tool_call_rate"] - vllm["tool_call_rate"]) < 0.15, (native, vllm)
    log = pd.read_csv(results["vllm"][1] / "metrics.csv")
    # the engine samples the trainer's policy: its log-probs of every trained token are the trainer's
    assert log["rollout/logprob_abs_diff_max"].dropna().max() < 1e-3
    assert log["tools/calculator/calls"].dropna().gt(0).all()
