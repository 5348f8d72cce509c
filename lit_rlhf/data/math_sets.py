"""``lit-rlhf prepare gsm8k|math --out DIR``: the math recipes' prompt files.

Writes ``DIR/train.jsonl`` and ``DIR/test.jsonl``, one record per problem::

    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": <problem> + <instruction>}],
     "answer": "72", ...}

The instruction asks for the final answer in the format the recipe's reward grades: after ``####``
for GSM8K (``lit_rlhf.rewards.math.gsm8k_strict``), in ``\\boxed{}`` for MATH
(``lit_rlhf.rewards.math.math_verify``). ``answer`` is the reference: GSM8K's number after ``####``,
MATH's last ``\\boxed{}`` of the solution. The source is the datasets hub (``openai/gsm8k``,
``DigitalLearningGmbH/MATH-lighteval``), or ``--from`` a local copy: a folder with its split files
(``train*``/``test*`` ``.parquet``/``.jsonl``/``.json``, as ``hf download`` leaves them) or one file
(the split named by ``--split``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from lit_rlhf.data.chat import DataError
from lit_rlhf.data.files import FILE_FORMATS, read_rows
from lit_rlhf.rewards.math import number
from lit_rlhf.textfiles import write_files

SYSTEM_PROMPT = "You are a helpful assistant."
SPLITS = ("train", "test")


@dataclass(frozen=True)
class MathSet:
    """A dataset's hub name (and config), its problem and solution fields, and the instruction."""

    hub: str
    config: str | None
    problem: str
    solution: str
    instruction: str


SETS = {
    "gsm8k": MathSet(
        "openai/gsm8k",
        "main",
        "question",
        "answer",
        'Let\'s think step by step and output the final answer after "####".',
    ),
    "math": MathSet(
        "DigitalLearningGmbH/MATH-lighteval",
        None,
        "problem",
        "solution",
        "Let's think step by step and output the final answer within \\boxed{}.",
    ),
}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced


def reference(name: str, solution: str) -> str | None:
    """The reference answer of a solution: GSM8K's number after ``####``, MATH's last boxed answer
    (None: the solution has none, or GSM8K's is not a number the rewards can grade)."""
    if name == "gsm8k":
        if "####" not in solution:
            return None
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        return answer if number(answer) is not None else None
    return last_boxed(solution) or None  # an empty \boxed{} is no answer


def records(name: str, rows: list[tuple[int, dict]], source: str, system_prompt: str | None) -> list[dict]:
    """The prompt records of a split's ``(row, record)`` pairs; a bad record is named by source and row."""
    spec = SETS[name]
    out = []
    for row, record in rows:
        where = f"{source}, row {row}"
        for field in (spec.problem, spec.solution):
            if not isinstance(record.get(field), str) or not record[field].strip():
                fields = f"{spec.problem!r} and {spec.solution!r}"
                raise DataError(f"{where}: no {field!r} text (a {name} record has {fields})")
        answer = reference(name, record[spec.solution])
        if answer is None:
            form = "'#### <number>', a number" if name == "gsm8k" else "a non-empty \\boxed{} answer"
            tail = record[spec.solution].strip()[-60:]
            raise DataError(f"{where}: its {spec.solution!r} has no final answer ({form}); it ends {tail!r}")
        messages = [{"role": "user", "content": f"{record[spec.problem].strip()} {spec.instruction}"}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        extra = {k: v for k, v in record.items() if k not in (spec.problem, spec.solution, "prompt", "answer")}
        out.append({"prompt": messages, "answer": answer, "solution": record[spec.solution], **extra})
    return out


def split_files(folder: str, split: str) -> list[str]:
    """A local copy's files of ``split`` (``train*``/``test*`` under ``folder``, in name order), all in
    one folder: a whole hub download holds one folder per config (GSM8K's ``main/`` and ``socratic/``),
    whose problems would each be read twice."""
    found = []
    for extension in FILE_FORMATS:
        found += glob.glob(os.path.join(folder, "**", f"{split}*{extension}"), recursive=True)
    folders = sorted({os.path.dirname(path) for path in found})
    if len(folders) > 1:
        names = ", ".join(os.path.relpath(f, folder) + "/" for f in folders)
        raise ValueError(
            f"--from {folder!r} holds {split}* files in {len(folders)} folders ({names}), one per config: "
            f"pass --from the config's own folder, e.g. --from {folders[0]}"
        )
    return sorted(found)


def read_split(name: str, split: str, source: str | None) -> tuple[list[tuple[int, dict]], str]:
    """A split's ``(row, record)`` pairs and where they came from."""
    spec = SETS[name]
    if source is None:
        try:
            import datasets

            data = datasets.load_dataset(spec.hub, spec.config, split=split)
        except Exception as error:
            raise RuntimeError(
                f"cannot load {spec.hub} ({split}) from the datasets hub: {error}. Without network access, pass "
                f"--from a local copy of it (a folder with its {split}* files, or one file)"
            ) from error
        return list(enumerate(data.to_list(), start=1)), spec.hub
    if os.path.isdir(source):
        files = split_files(source, split)
        if not files:
            raise FileNotFoundError(f"--from {source!r} has no {split}* file (.parquet, .jsonl, .json or .csv)")
        return [(f"{path}:{row}", record) for path in files for row, record in read_rows(path)], source
    return read_rows(source), source


def to_jsonl(records: list[dict], where: str) -> str:
    """The records as JSONL text; a value JSON cannot hold (a date, bytes) is named by row and column."""
    lines = []
    for row, record in enumerate(records, start=1):
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError):
            bad = [k for k, v in record.items() if not _serialisable(v)]
            raise DataError(
                f"{where}, record {row}: column(s) {bad} hold values JSON cannot store "
                f"({', '.join(type(record[k]).__name__ for k in bad)}); convert or drop them first"
            ) from None
    return "".join(line + "\n" for line in lines)


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def check_out(out: str) -> None:
    """``--out`` is a folder, or can be made one: checked before anything is read."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out!r} is a file: pass a folder (it is made if missing)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out!r}: cannot write in {parent!r}; pass a folder you can write to")


def prepare(
    name: str,
    out: str,
    source: str | None = None,
    split: str | None = None,
    system_prompt: str | None = SYSTEM_PROMPT,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``out/<split>.jsonl`` for each split (both, or ``split``); returns the records per split.

    Every split is read and checked before anything is written, and an existing file is replaced only
    with ``overwrite``."""
    if name not in SETS:
        raise ValueError(f"unknown dataset {name!r}: prepare one of {', '.join(SETS)}")
    check_out(out)
    if source is not None and not os.path.exists(source):
        raise FileNotFoundError(f"--from {source!r} does not exist")
    splits = (split,) if split else SPLITS if source is None or os.path.isdir(source) else ("train",)
    targets = {s: os.path.join(out, f"{s}.jsonl") for s in splits}
    existing = [path for path in targets.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist: pass --overwrite to replace them, or another --out"
        )
    prepared, texts = {}, {}
    for s in splits:
        rows, where = read_split(name, s, source)
        prepared[s] = records(name, rows, where, system_prompt)
        if not prepared[s]:
            raise ValueError(f"{where} ({s}) has no records")
        texts[targets[s]] = to_jsonl(prepared[s], f"{where} ({s})")
    os.makedirs(out, exist_ok=True)
    write_files(texts)
    return {s: len(recs) for s, recs in prepared.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-rlhf prepare",
        description="Write a math dataset's train/test prompt files (JSONL) for the recipes in configs/recipes/.",
    )
    p.add_argument("dataset", choices=sorted(SETS), help="gsm8k (openai/gsm8k) or math (MATH, boxed answers)")
    p.add_argument("--out", required=True, help="output folder (train.jsonl, test.jsonl)")
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="a local copy instead of the hub: a folder with its train*/test* files, or one file",
    )
    p.add_argument("--split", default=None, help="only this split (a single --from file is written as train)")
    p.add_argument("--system_prompt", default=SYSTEM_PROMPT, help="the system message of every prompt ('' for none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/test files in --out")
    return p


def main(args: list[str]) -> dict[str, Any]:
    known = parser().parse_args(args)
    try:
        counts = prepare(
            known.dataset, known.out, known.source, known.split, known.system_prompt or None, known.overwrite
        )
    except (ValueError, OSError, RuntimeError) as error:  # DataError is a ValueError: the message says it all
        print(f"lit-rlhf prepare: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    for split, count in counts.items():
        print(f"wrote {count} {known.dataset} prompts to {os.path.join(known.out, split + '.jsonl')}")
    for split in SPLITS:
        kept = os.path.join(known.out, split + ".jsonl")
        if split not in counts and os.path.exists(kept):
            print(f"note: {kept} was not written now; it is left as an earlier prepare wrote it")
    return counts
