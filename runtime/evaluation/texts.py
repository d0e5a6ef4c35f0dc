"""Evaluation text: any folder of .txt files, one .txt file, or an L-Eval style .jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class EvalDataError(ValueError):
    """The evaluation data cannot be found or read (the message says what was expected)."""


@dataclass(frozen=True)
class QARecord:
    """One long-context question (L-Eval layout: a document with several instructions and outputs)."""

    document: str
    question: str
    answer: str


def builtin_tasks() -> list[str]:
    """The shipped self-instruct tasks (``runtime/data/self_instruct.jsonl``) as plain text, one per record:
    instruction, input and output joined by spaces (the ``generate`` demo prompt lists them)."""
    from ..resources import data_file

    tasks = []
    for line in data_file("self_instruct.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            parts = [str(record.get(key) or "").strip() for key in ("instruction", "input", "output")]
            tasks.append(" ".join(part for part in parts if part))
    return tasks


def read_texts(path: str | Path) -> list[str]:
    """Texts of a folder of .txt files (sorted by name), of one .txt file, or the documents of a .jsonl."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise EvalDataError(f"{path} holds no .txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if path.suffix == ".txt" and path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl" and path.is_file():
        return list(dict.fromkeys(r.document for r in read_qa(path)))  # file order, each document once
    raise EvalDataError(f"evaluation data {path} is not a folder of .txt files, a .txt file or a .jsonl file")


def read_qa(path: str | Path) -> list[QARecord]:
    """Questions of an L-Eval .jsonl (fields ``input``, ``instructions``, ``outputs``), in file order."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                document, questions, answers = row["input"], row["instructions"], row["outputs"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise EvalDataError(f"{path}:{number}: not an L-Eval record ({exc})") from exc
            for question, answer in zip(questions, answers):
                records.append(QARecord(document=document, question=question, answer=str(answer)))
    if not records:
        raise EvalDataError(f"{path} holds no questions")
    return records


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized (no special tokens) and joined with a blank line: int64 ``[T]``."""
    joined = "\n\n".join(t.strip() for t in texts)
    return torch.tensor(tokenizer(joined, add_special_tokens=False).input_ids, dtype=torch.long)


def windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` disjoint windows of ``length`` tokens, spread evenly over the stream: ``[count, length]``."""
    available = stream.numel() // length
    if available < 1:
        raise EvalDataError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {length}")
    count = min(count, available)
    step = available // count
    return torch.stack([stream[i * step * length : (i * step + 1) * length] for i in range(count)])
