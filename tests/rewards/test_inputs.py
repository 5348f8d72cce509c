"""What reward functions are called with: missing columns are errors, TRL-style rewards get messages."""

import json

import pytest

from lit_rlhf import PromptDataModule
from lit_rlhf.rewards import RewardBatch, RewardError, RewardFunction, score_components


def batch_from(path, tokenizer_path, **kwargs):
    dm = PromptDataModule(str(path), tokenizer_path=tokenizer_path, **kwargs)
    dm.setup("fit")
    batch = dm.collate(dm.train_prompts)
    responses = [f"reply {i}" for i in range(len(batch["prompts"]))]
    return RewardBatch(batch["prompts"], responses, batch["columns"]), dm


def test_a_column_a_reward_reads_that_a_row_lacks_names_the_column_file_and_row(tiny_assets, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}]) + "\n")
    batch, _ = batch_from(path, tiny_assets["policy"])

    def named(prompts, responses, answer):
        return [0.0] * len(prompts)

    def by_kwargs(completions, **kwargs):
        return [float(a == "2") for a in kwargs["answer"]]

    def ignores(prompts, responses):
        return [1.0] * len(prompts)

    expected = f"reads the column 'answer', but {path}, row 2 has no field 'answer' \\(row 1 of the batch\\)"
    with pytest.raises(RewardError, match=f"reward named {expected}"):
        score_components([RewardFunction(named)], batch)
    with pytest.raises(RewardError, match=f"reward by_kwargs {expected}"):
        score_components([RewardFunction(by_kwargs)], batch)
    assert score_components([RewardFunction(ignores)], batch)["ignores"].tolist() == [1.0, 1.0]


def test_trl_style_rewards_get_completions_as_messages_for_conversations(chatml_assets):
    batch, dm = batch_from(
        chatml_assets["prompts"], chatml_assets["policy"], field="messages", apply_chat_template=True
    )
    seen = {}

    def trl_length(completions, **kwargs):
        seen.update(kwargs)
        return [len(c[0]["content"]) for c in completions]

    scores = score_components([RewardFunction(trl_length)], batch)["trl_length"]
    assert scores.tolist() == [float(len(r)) for r in batch.responses]
    assert seen["prompt_messages"][3] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Add 3 and 3."},
    ]
    assert seen["prompts"][3] == dm.train_prompts[3].text, "prompts keep their meaning: the rendered template"
    assert seen["responses"] == batch.responses and "prompt_messages" not in batch.columns


def test_trl_style_rewards_get_plain_text_for_plain_prompts(tiny_assets):
    batch, _ = batch_from(tiny_assets["prompts"], tiny_assets["policy"])
    seen = {}

    def trl_style(prompts, completions, prompt_messages, answer):
        seen.update(completions=completions, prompt_messages=prompt_messages, answer=answer)
        return [0.0] * len(prompts)

    score_components([RewardFunction(trl_style)], batch)
    assert seen["completions"] == batch.responses and set(seen["prompt_messages"]) == {None}
    assert all(isinstance(a, str) for a in seen["answer"])
