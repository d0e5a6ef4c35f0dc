"""Passkey retrieval and needle-in-a-haystack, as a depth × length grid, with the plan's retention.

Prompt format (measured in DESIGN.md: it decides whether SmolLM2 finds the key at all): a one-line instruction
first, the key sentence as its own paragraph inside filler text, and the question as its own paragraph. The
context (instruction + filler + key) is prefilled, so compressed; the question is fed after it, then the answer is
decoded greedily. A case is a hit when the answer contains the expected string. Retention = the method's hits
among the cases the full cache gets right.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .decoding import answer
from .methods import Method

PASSKEY_INSTRUCTION = (
    "There is a pass key hidden in the following text. Find it and memorize it. "
    "I will quiz you about the pass key later.\n\n"
)
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLES = (
    (
        "The best thing to do in San Francisco is to eat a sandwich and sit in Dolores Park on a sunny day.",
        "\n\nWhat is the best thing to do in San Francisco? Answer: The best thing to do in San Francisco is to",
        "Dolores Park",
    ),
    (
        "The secret ingredient of the village's famous soup is roasted chestnuts.",
        "\n\nWhat is the secret ingredient of the village's famous soup? Answer: The secret ingredient is",
        "chestnut",
    ),
)
NEEDLE_INSTRUCTION = "Read the following text carefully; a question about it follows.\n\n"
FALLBACK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    depth: float
    context: torch.Tensor  # [1, N]
    question: torch.Tensor  # [1, Q]
    expected: str


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def _bos(tokenizer) -> torch.Tensor:
    bos = getattr(tokenizer, "bos_token_id", None)
    return torch.tensor([bos] if bos is not None else [], dtype=torch.long)


def _haystack(tokenizer, filler: torch.Tensor, head: str, needle: str, length: int, depth: float) -> torch.Tensor:
    """``[1, length]``: BOS + head + filler with ``needle`` as its own paragraph at ``depth`` of the filler."""
    head_ids = torch.cat([_bos(tokenizer), _ids(tokenizer, head)])
    needle_ids = _ids(tokenizer, "\n\n" + needle + "\n\n")
    room = length - head_ids.numel() - needle_ids.numel()
    if room < 1:
        raise ValueError(f"context length {length} is too short for the retrieval prompt")
    while filler.numel() < room:
        filler = torch.cat([filler, filler])
    body = filler[:room]
    cut = int(round(depth * room))
    return torch.cat([head_ids, body[:cut], needle_ids, body[cut:]])[None, :]


def build_cases(
    tokenizer, filler_text: str | None, lengths: list[int], depths: list[float], trials: int, seed: int,
    tasks: tuple[str, ...] = ("passkey", "needle"),
) -> list[Case]:
    """The grid of prompts (seeded): for each task, length and depth, ``trials`` cases."""
    rng = random.Random(seed)
    filler = _ids(tokenizer, filler_text if filler_text else FALLBACK_FILLER * 400)
    cases = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for trial in range(trials):
                    if task == "passkey":
                        key = str(rng.randint(10000, 99999))
                        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
                        head, question, expected = PASSKEY_INSTRUCTION, PASSKEY_QUESTION, key
                    else:
                        needle, question, expected = NEEDLES[trial % len(NEEDLES)]
                        head = NEEDLE_INSTRUCTION
                    offset = rng.randrange(0, max(1, filler.numel() - length))
                    context = _haystack(tokenizer, filler[offset:], head, needle, length, depth)
                    cases.append(Case(task, length, depth, context, _ids(tokenizer, question)[None, :], expected))
    return cases


def run(
    model, tokenizer, methods: list[Method], cases: list[Case], max_new_tokens: int = 10,
    question_in_prefill: bool = False, progress: Callable[[int], None] | None = None,
) -> dict:
    """Answer every case with every method; hits per method and per (task, length, depth) cell.

    ``progress(1)`` is called after each answer (one case, one method).

    By default the context is compressed before the question is seen (as kvpress's pipeline does: the harder,
    query-agnostic setting). ``question_in_prefill`` prefills context and question together, as a plain
    ``generate(prompt)`` does, so that query-aware selection sees the question.
    """
    hits: dict[str, list[bool]] = {m.name: [] for m in methods}
    answers: dict[str, list[str]] = {m.name: [] for m in methods}
    for case in cases:
        context, question = case.context, case.question
        if question_in_prefill:
            context, question = torch.cat([context, question], dim=1), None
        for method in methods:
            tokens, _ = answer(model, method, context, question, max_new_tokens)
            text = tokenizer.decode(tokens[0], skip_special_tokens=True)
            answers[method.name].append(text)
            hits[method.name].append(case.expected.lower() in text.lower())
            if progress is not None:
                progress(1)
    reference = methods[0].name
    results = {}
    for method in methods:
        mine = hits[method.name]
        solved = [i for i, ok in enumerate(hits[reference]) if ok]
        retained = sum(mine[i] for i in solved)
        results[method.name] = {
            "accuracy": sum(mine) / len(mine) if mine else 0.0,
            "retention": retained / len(solved) if solved else None,
            "grid": _grid(cases, mine),
            "answers": answers[method.name],
        }
    return results


def _grid(cases: list[Case], hits: list[bool]) -> dict[str, float]:
    """Accuracy per ``task/length/depth`` cell."""
    cells: dict[str, list[bool]] = {}
    for case, ok in zip(cases, hits):
        cells.setdefault(f"{case.task}/{case.length}/{case.depth:g}", []).append(ok)
    return {key: sum(v) / len(v) for key, v in cells.items()}
