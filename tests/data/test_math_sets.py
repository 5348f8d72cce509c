"""``lit-rlhf prepare gsm8k|math``: prompt files from a local copy (offline), checked before writing."""

import json

import pandas as pd
import pytest

from lit_rlhf.cli import main
from lit_rlhf.data.chat import DataError
from lit_rlhf.data.math_sets import last_boxed, prepare
from lit_rlhf.rewards.math import gsm8k_strict, math_verify

GSM8K = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72",
    },
    {"question": "A shirt costs $1,200 and a hat $34. What do both cost?", "answer": "1200+34=1234\n#### 1,234"},
    {"question": "It was 3 degrees and fell by 8. What is it now?", "answer": "3-8=-5\n#### -5"},
]
MATH = [
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "It is $\\boxed{\\frac{3}{4}}$.",
        "level": "Level 1",
        "type": "Algebra",
    },
    {"problem": "Solve $x^2 = 4$, $x > 0$.", "solution": "So $x = \\boxed{2}$.", "level": "Level 2", "type": "Algebra"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gsm8k_from_a_local_copy_writes_chat_prompts_with_the_number_as_answer(tmp_path, capsys):
    copy = tmp_path / "gsm8k" / "main"
    write_jsonl(copy / "train-00000-of-00001.jsonl", GSM8K)
    write_jsonl(copy / "test-00000-of-00001.jsonl", GSM8K[:1])
    main(["prepare", "gsm8k", "--out", str(tmp_path / "out"), "--from", str(tmp_path / "gsm8k")])
    assert "wrote 3 gsm8k prompts" in capsys.readouterr().out
    train, test = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "test.jsonl")
    assert [r["answer"] for r in train] == ["72", "1234", "-5"] and len(test) == 1
    system, user = train[0]["prompt"]
    assert system == {"role": "system", "content": "You are a helpful assistant."}
    assert user["role"] == "user" and user["content"].startswith(GSM8K[0]["question"])
    assert user["content"].endswith('output the final answer after "####".')
    # the answers grade the GSM8K solutions themselves as right
    assert gsm8k_strict([""] * 3, [r["solution"] for r in train], [r["answer"] for r in train]) == [1.0] * 3


def test_math_from_a_parquet_copy_takes_the_last_boxed_answer_and_keeps_other_fields(tmp_path):
    copy = tmp_path / "math"
    copy.mkdir()
    pd.DataFrame(MATH).to_parquet(copy / "train.parquet")
    pd.DataFrame(MATH[1:]).to_parquet(copy / "test.parquet")
    counts = prepare("math", str(tmp_path / "out"), str(copy), system_prompt=None)
    assert counts == {"train": 2, "test": 1}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["answer"] for r in train] == ["\\frac{3}{4}", "2"]
    assert [m["role"] for m in train[0]["prompt"]] == ["user"], "no system prompt"
    assert train[0]["prompt"][0]["content"].endswith("within \\boxed{}.") and train[0]["level"] == "Level 1"
    assert math_verify([""] * 2, [r["solution"] for r in train], [r["answer"] for r in train]) == [1.0, 1.0]


def test_last_boxed_keeps_nested_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("no box") is None and last_boxed("\\boxed{1") is None


def test_a_single_file_is_the_train_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, GSM8K)
    assert prepare("gsm8k", str(tmp_path / "out"), str(path)) == {"train": 3}


def test_bad_input_is_named_and_nothing_written_is_lost(tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, GSM8K)
    prepare("gsm8k", str(out), str(path))
    before = (out / "train.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare("gsm8k", str(out), str(path))
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [*GSM8K, {"question": "q", "answer": "no final line"}])
    with pytest.raises(DataError, match="row 4.*'#### <number>'"):
        prepare("gsm8k", str(out), str(bad), overwrite=True)
    assert (out / "train.jsonl").read_text() == before, "a failed prepare leaves the earlier file"
    write_jsonl(bad, [{"question": "q"}])
    with pytest.raises(DataError, match="row 1: no 'answer' text"):
        prepare("gsm8k", str(tmp_path / "other"), str(bad))
    with pytest.raises(FileNotFoundError, match="no test\\* file"):
        prepare("gsm8k", str(tmp_path / "other"), str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare("gsm8k", str(tmp_path / "other"), str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        main(["prepare", "aime", "--out", str(tmp_path / "other")])


def test_without_a_local_copy_offline_the_error_says_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="openai/gsm8k.*pass --from a local copy"):
        prepare("gsm8k", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_split_that_cannot_be_written_replaces_no_file_and_leaves_no_temporary(tmp_path):
    """The test split has a date column JSON cannot hold: the error names it, and the earlier train and
    test files are untouched (all splits are serialised, then written, then renamed together)."""
    copy, out = tmp_path / "copy", tmp_path / "out"
    copy.mkdir()
    pd.DataFrame(GSM8K).to_parquet(copy / "train.parquet")
    pd.DataFrame(GSM8K[:1]).to_parquet(copy / "test.parquet")
    prepare("gsm8k", str(out), str(copy))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pd.DataFrame(GSM8K[1:]).to_parquet(copy / "train.parquet")
    pd.DataFrame([{**GSM8K[0], "when": pd.Timestamp("2026-01-01")}]).to_parquet(copy / "test.parquet")
    with pytest.raises(DataError, match=r"test.*record 1: column\(s\) \['when'\].*datetime"):
        prepare("gsm8k", str(out), str(copy), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_prepared_files_get_the_umask_permissions(tmp_path):
    import os

    path = tmp_path / "mine.jsonl"
    write_jsonl(path, GSM8K)
    old = os.umask(0o022)
    try:
        prepare("gsm8k", str(tmp_path / "out"), str(path))
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "train.jsonl").stat().st_mode & 0o777 == 0o644


def test_a_whole_hub_download_with_several_configs_is_refused(tmp_path):
    """openai/gsm8k's download holds main/ and socratic/: reading both would give every problem twice."""
    for config in ("main", "socratic"):
        write_jsonl(tmp_path / "gsm8k" / config / "train-00000-of-00001.jsonl", GSM8K)
        write_jsonl(tmp_path / "gsm8k" / config / "test-00000-of-00001.jsonl", GSM8K[:1])
    with pytest.raises(ValueError, match=r"2 folders \(main/, socratic/\).*--from .*main"):
        prepare("gsm8k", str(tmp_path / "out"), str(tmp_path / "gsm8k"))
    assert prepare("gsm8k", str(tmp_path / "out"), str(tmp_path / "gsm8k" / "main")) == {"train": 3, "test": 1}


@pytest.mark.parametrize(
    ("name", "record", "form"),
    [
        (
            "gsm8k",
            {"question": "q", "answer": "5 + 5\n#### 10 dollars"},
            "a number.*ends '5 \\+ 5\\\\n#### 10 dollars'",
        ),
        ("gsm8k", {"question": "q", "answer": "#### seventy"}, "a number"),
        ("math", {"problem": "p", "solution": "So $\\boxed{}$."}, "non-empty"),
    ],
)
def test_a_reference_the_reward_could_not_grade_is_refused_when_preparing(tmp_path, name, record, form):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [record])
    with pytest.raises(DataError, match=f"row 1: .*no final answer.*{form}"):
        prepare(name, str(tmp_path / "out"), str(path))
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_reading(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match="--out .* is a file"):
        prepare("gsm8k", str(tmp_path / "afile"), str(tmp_path / "missing.jsonl"))
    assert (tmp_path / "afile").read_text() == "mine"


def test_the_command_prints_the_error_without_a_traceback_and_exits_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prepare", "gsm8k", "--out", str(tmp_path / "out"), "--from", str(tmp_path / "missing.jsonl")])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("lit-rlhf prepare: error: --from") and "does not exist" in err and "Traceback" not in err
