"""Preference pairs that teach nothing: equal or empty answers (errors), pairs truncation made equal (counted)."""

import json
from types import SimpleNamespace

import pytest

from lit_rlhf import PreferenceDataModule
from lit_rlhf.data.chat import DataError
from lit_rlhf.data.pairs import first_difference
from lit_rlhf.tasks import chat_tokenizer

CORPUS = ["be brief", "What is 2+3?", "It is 5.", "It is 6.", "8, of course.", "the long answer is"] * 40
USER = {"role": "user", "content": "What is 2+3?"}


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("chatml", CORPUS)


def write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def attach(datamodule, tok):
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    datamodule.setup("fit")
    return datamodule


def pairs(n_identical, n_total):
    """``n_total`` pairs whose answers differ only in their last word; the first ``n_identical`` are long.

    The long ones share 40 repetitions of "the long answer is" before the difference, so
    ``max_length=64`` cuts them inside the shared part; the short ones differ within 20 tokens.
    """
    long = " the long answer is" * 40
    return [
        {
            "prompt": "What is 2+3?",
            "chosen": (long if i < n_identical else "") + " It is 5.",
            "rejected": (long if i < n_identical else "") + " It is 6.",
        }
        for i in range(n_total)
    ]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([1, 2], [1, 2]) is None


def test_pairs_that_truncation_makes_identical_above_the_threshold_stop_with_count_and_fix(tok, tmp_path):
    path = write(tmp_path, pairs(44, 64))
    with pytest.raises(DataError) as err:
        attach(PreferenceDataModule(path, max_length=64), tok)
    message = str(err.value)
    assert "pairs.jsonl: 44 of 64 preference pairs (68.8%) have identical chosen and rejected token ids" in message
    assert "data.max_length=64" in message and "rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ..." in message
    assert "more than data.max_identical_fraction=0.05" in message
    assert "raise data.max_length" in message and "raise data.max_identical_fraction" in message
    needed = int(message.split("data.max_length >= ")[1].split(" ")[0])
    assert attach(PreferenceDataModule(path, max_length=needed), tok).train_examples  # the stated fix works
    with pytest.raises(DataError, match="44 of 64 preference pairs"):
        attach(PreferenceDataModule(path, max_length=needed - 1), tok)


def test_pairs_that_truncation_makes_identical_below_the_threshold_are_counted_and_dropped(tok, tmp_path):
    path = write(tmp_path, pairs(3, 64))  # 3/64 = 4.7% <= 5%
    with pytest.warns(UserWarning, match=r"3 of 64 preference pairs \(4.7%\).*rows 1, 2, 3;.*dropped from training"):
        dm = attach(PreferenceDataModule(path, max_length=64), tok)
    assert len(dm.train_examples) == len(dm.train_records) == 61
    assert all(e.chosen_ids != e.rejected_ids for e in dm.train_examples)
    assert all("long" not in r["chosen"] for r in dm.train_records), "records and examples stay aligned"
    path = write(tmp_path, pairs(44, 64), "many.jsonl")
    with pytest.warns(UserWarning, match="44 of 64 preference pairs"):
        dm = attach(PreferenceDataModule(path, max_length=64, max_identical_fraction=0.7, val_size=4), tok)
    assert len(dm.train_examples) + len(dm.val_examples) == 20


def test_every_pair_identical_is_an_error_whatever_the_threshold(tok, tmp_path):
    path = write(tmp_path, pairs(4, 4))
    with pytest.raises(DataError, match="4 of 4 preference pairs"):
        attach(PreferenceDataModule(path, max_length=64, max_identical_fraction=1.0), tok)
    with pytest.raises(ValueError, match="data.max_identical_fraction must be in \\[0, 1\\], got 1.5"):
        PreferenceDataModule(path, max_identical_fraction=1.5)


GOOD = {"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": "It is 6."}


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": "It is 5."},
            "row 2, field 'rejected': the rejected answer equals the chosen one \\(field 'chosen'\\)",
        ),
        (
            {"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": " It is 5.\n"},
            "row 2, field 'rejected': the rejected answer equals the chosen one",
        ),
        (
            {
                "prompt": [USER],
                "chosen": [{"role": "assistant", "content": "It is 5."}],
                "rejected": [{"role": "assistant", "content": "It is 5."}],
            },
            "row 2, field 'rejected': the rejected answer equals the chosen one",
        ),
        (
            {"prompt": "What is 2+3?", "chosen": "", "rejected": "It is 6."},
            "row 2, field 'chosen': the chosen answer is empty",
        ),
        (
            {"prompt": "What is 2+3?", "chosen": "  \n", "rejected": "It is 6."},
            "row 2, field 'chosen': the chosen answer is empty",
        ),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": ""}],
                "rejected": [USER, {"role": "assistant", "content": "6"}],
            },
            "row 2, field 'chosen': the chosen answer is empty",
        ),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "5"}],
                "rejected": [USER, {"role": "assistant", "content": "5 "}],
            },
            "row 2, field 'rejected': the rejected answer equals the chosen one",
        ),
    ],
)
def test_equal_or_empty_answers_name_file_row_and_field(tok, tmp_path, record, message):
    path = write(tmp_path, [GOOD, record])
    with pytest.raises(DataError, match=f"pairs.jsonl, {message}"):
        attach(PreferenceDataModule(path), tok)
    if all(isinstance(v, str) for v in record.values()):  # plain text is checked the same way
        with pytest.raises(DataError, match=f"pairs.jsonl, {message}"):
            attach(PreferenceDataModule(path, apply_chat_template=False), tok)


def test_an_empty_rejected_answer_is_a_real_worse_answer(tok, tmp_path):
    path = write(tmp_path, [GOOD, {"prompt": "What is 2+3?", "chosen": "It is 5.", "rejected": ""}])
    assert len(attach(PreferenceDataModule(path), tok).train_examples) == 2
