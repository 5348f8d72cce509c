"""Reading records from local files or the datasets hub, with clear errors."""

from __future__ import annotations

import os

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_records(path: str, split: str = "train") -> list[dict]:
    """All records of a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a hub dataset split.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an unknown extension, or a dataset with no records.
    """
    import datasets

    extension = os.path.splitext(path)[1].lower()
    looks_local = extension or os.path.sep in path or path.startswith(".")
    if looks_local:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        if extension not in FILE_FORMATS:
            raise ValueError(f"unsupported data file {path!r}; use one of {', '.join(FILE_FORMATS)}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty; it needs at least one record")
        dataset = datasets.load_dataset(FILE_FORMATS[extension], data_files=path, split="train")
    else:
        dataset = datasets.load_dataset(path, split=split)
    if len(dataset) == 0:
        raise ValueError(f"dataset {path!r} is empty; it needs at least one record")
    return dataset.to_list()


def split_train_val(records: list, path: str, val_records: list | None, val_size: int, seed: int) -> tuple[list, list]:
    """``(train, val)``: ``val_records`` when given, else ``val_size`` records split off at random (seeded)."""
    if val_records is not None:
        return records, val_records
    if not val_size:
        return records, []
    if val_size >= len(records):
        raise ValueError(f"val_size={val_size} leaves no training records out of {len(records)} in {path!r}")
    import torch

    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[val_size:]], [records[i] for i in order[:val_size]]
