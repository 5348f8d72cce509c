"""Reading records and splitting off validation data."""

import pytest

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
