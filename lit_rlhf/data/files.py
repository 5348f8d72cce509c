"""Reading records from local files or the datasets hub, with clear errors."""

from __future__ import annotations

import json
import os

from lit_rlhf.data.chat import DataError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_rows(path: str, split: str = "train") -> list[tuple[int, dict]]:
    """``(row, record)`` pairs of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a hub split.

    ``row`` is 1-based: a JSONL file's line number (blank lines are skipped), else the record's index + 1.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an unknown extension, or a dataset with no records.
        DataError: a JSONL line that is not UTF-8, not JSON or not an object (named by file and line).
    """
    extension = os.path.splitext(path)[1].lower()
    looks_local = extension or os.path.sep in path or path.startswith(".")
    if looks_local:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        if extension not in FILE_FORMATS:
            raise ValueError(f"unsupported data file {path!r}; use one of {', '.join(FILE_FORMATS)}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty; it needs at least one record")
        rows = _read_jsonl(path) if extension == ".jsonl" else _read_dataset(FILE_FORMATS[extension], path)
    else:
        import datasets

        rows = list(enumerate(datasets.load_dataset(path, split=split).to_list(), start=1))
    if not rows:
        raise ValueError(f"dataset {path!r} is empty; it needs at least one record")
    return rows


def load_records(path: str, split: str = "train") -> list[dict]:
    """All records of ``path`` (see :func:`read_rows`)."""
    return [record for _, record in read_rows(path, split)]


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path, "rb") as f:  # bytes: a decoding error is then one line's, and named by it
        for line_number, raw in enumerate(f, start=1):
            line = _decode(raw, path, line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"not valid JSON ({err.msg}, column {err.colno})"
                raise DataError(f"{path}, line {line_number}: {problem}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
            rows.append((line_number, record))
    return rows


def _decode(raw: bytes, path: str, line_number: int) -> str:
    """One JSONL line as text (JSON is UTF-8; a byte-order mark on the first line is allowed)."""
    try:
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}, line {line_number}: not valid UTF-8 (byte {raw[err.start]:#04x} at byte {err.start + 1} of the "
            f"line: {err.reason}); save the file as UTF-8 or fix that byte"
        ) from None


def _read_dataset(kind: str, path: str) -> list[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as err:  # datasets wraps parse errors; name the file
        raise ValueError(f"cannot read {path!r} as {kind}: {err}") from err
    return list(enumerate(dataset.to_list(), start=1))


def split_train_val(records: list, path: str, val_records: list | None, val_size: int, seed: int) -> tuple[list, list]:
    """``(train, val)``: ``val_records`` when given, else ``val_size`` records split off at random (seeded)."""
    if val_records is not None:
        return records, val_records
    if not val_size:
        return records, []
    if val_size >= len(records):
        raise ValueError(f"val_size={val_size} leaves no training records out of {len(records)} in {path!r}")
    import torch

    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
    order = order.tolist()
    return [records[i] for i in order[val_size:]], [records[i] for i in order[:val_size]]
