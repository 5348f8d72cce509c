"""The README's Python examples run as written (with the tiny assets in place of the demo's)."""

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_python_api_example_trains_with_two_reward_components(tiny_assets, tmp_path, monkeypatch):
    block = next(b for b in python_blocks() if "RewardFunction(exact_match" in b)
    code = (
        block.replace("assets/demo/sft", tiny_assets["policy"])
        .replace("assets/demo/rm", tiny_assets["reward"])
        .replace("assets/demo/prompts.jsonl", tiny_assets["prompts"])
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    module = namespace["module"]
    assert module.current_epoch == 2 and module.buffer.experience is not None
    reward_model, exact = module.rewards
    assert (reward_model.weight, exact.weight, exact.name) == (1.0, 0.5, "exact_match")
    assert set(module.component_scores) == {"reward_model", "exact_match"}


def test_subclass_example_adds_to_the_components(tiny_assets):
    block = next(b for b in python_blocks() if "class LengthPenalisedPPO" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    from lit_rlhf.rewards import RewardFunction

    module = namespace["LengthPenalisedPPO"](
        models={"actor_path": tiny_assets["policy"]},
        rewards=[RewardFunction(lambda prompts, responses: [1.0] * len(prompts), name="one")],
    )
    scores = module.compute_reward(["p", "p"], ["x" * 20, "x" * 30])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.5]))
