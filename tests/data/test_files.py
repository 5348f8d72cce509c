"""Reading records and splitting off validation data."""

import pytest

from lit_rlhf.data.chat import DataError
from lit_rlhf.data.files import load_records, split_train_val


def test_split_train_val_is_seeded_disjoint_and_complete():
    records = list(range(20))
    train, val = split_train_val(records, "x.jsonl", None, 5, seed=3)
    assert len(val) == 5 and sorted(train + val) == records
    assert split_train_val(records, "x.jsonl", None, 5, seed=3) == (train, val)
    assert split_train_val(records, "x.jsonl", None, 5, seed=4) != (train, val)
    assert split_train_val(records, "x.jsonl", ["v"], 5, seed=3) == (records, ["v"])
    assert split_train_val(records, "x.jsonl", None, 0, seed=3) == (records, [])
    with pytest.raises(ValueError, match="val_size=20 leaves no training records out of 20 in 'x.jsonl'"):
        split_train_val(records, "x.jsonl", None, 20, seed=0)


def test_load_records_formats_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("prompt\n1+1=\n2+2=\n")
    assert [r["prompt"] for r in load_records(str(tmp_path / "a.csv"))] == ["1+1=", "2+2="]
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_records(str(tmp_path / "b.txt"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_a_bad_utf8_byte_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\n{"prompt": "caf\xe9"}\n')  # Latin-1 e-acute, not UTF-8
    with pytest.raises(DataError, match=r"latin1.jsonl, line 3: not valid UTF-8 \(byte 0xe9 at byte 16 of the line"):
        load_records(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}\n')  # a byte-order mark, as Windows editors write
    assert load_records(str(path)) == [{"prompt": "café"}]


def test_a_bad_utf8_byte_stops_every_datamodule_with_the_line(tmp_path):
    from types import SimpleNamespace

    from lit_rlhf import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lit_rlhf.tasks import chat_tokenizer

    tok = chat_tokenizer("chatml", ["What is 2+3?", "It is 5."] * 20)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    for datamodule in (PromptDataModule(str(path)), SFTDataModule(str(path)), PreferenceDataModule(str(path))):
        datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
        with pytest.raises(DataError, match="bad.jsonl, line 2: not valid UTF-8"):
            datamodule.setup("fit")
