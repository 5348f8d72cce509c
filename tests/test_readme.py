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


def test_your_own_data_examples_load_as_written(tmp_path):
    """The three JSONL blocks of "Your own data": prompts, SFT records, preference pairs."""
    from types import SimpleNamespace

    from lit_rlhf import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lit_rlhf.tasks import chat_tokenizer

    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```jsonl\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) == 3
    tok = chat_tokenizer("chatml", [b for b in blocks] * 20)
    modules = [
        lambda path: PromptDataModule(path, apply_chat_template=True, field="prompt"),
        lambda path: SFTDataModule(path),
        lambda path: PreferenceDataModule(path),
    ]
    for i, (block, make) in enumerate(zip(blocks, modules, strict=True)):
        lines = block.strip().splitlines()
        if i == 0:  # prompts: the plain one under `prompt`, the conversations under `messages`
            path = tmp_path / "plain.jsonl"
            path.write_text(lines[0] + "\n")
            conversations = tmp_path / "messages.jsonl"
            conversations.write_text("\n".join(lines[1:]) + "\n")
            for file, field in ((path, "prompt"), (conversations, "messages")):
                dm = PromptDataModule(str(file), apply_chat_template=True, field=field)
                dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
                dm.setup("fit")
                assert all(r.text.endswith("<|im_start|>assistant\n") for r in dm.train_prompts)
            continue
        path = tmp_path / f"block{i}.jsonl"
        path.write_text(block)
        dm = make(str(path))
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
        dm.setup("fit")
        assert len(dm.train_examples) == 3


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_inside_the_readme_names_a_heading_it_has():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a '# comment' in a code block is no heading
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", prose))
    assert "grpo-rloo-and-reinforce" in anchors and "where-a-runs-files-are" in anchors
    assert links and links <= anchors, sorted(links - anchors)
