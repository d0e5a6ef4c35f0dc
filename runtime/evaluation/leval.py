"""L-Eval long-context QA: exact match for closed-ended tasks (answer letters), token F1 for open-ended ones.

The document (cut to ``context`` tokens) is prefilled, so compressed; the question follows as its own chunk with an
answer cue, then the answer is decoded greedily. Sized for GPU runs; on a CPU a few questions at 1–2k tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch

from .decoding import answer
from .methods import Method
from .texts import QARecord

_WORD = re.compile(r"\w+")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased word tokens."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_choice(reference: str) -> bool:
    """Closed-ended answers are option letters (``A``, ``B, D`` ...)."""
    return re.fullmatch(r"[A-Z](\s*,\s*[A-Z])*", reference.strip()) is not None


def exact_choice(prediction: str, reference: str) -> float:
    """1.0 when the letters the prediction starts with are the reference's letters."""
    wanted = set(re.findall(r"[A-Z]", reference))
    head = prediction.strip().split("\n")[0]
    found = set(re.findall(r"\b([A-Z])\b", head[: 4 * len(wanted) + 8]))
    return float(found == wanted)


def score(prediction: str, reference: str) -> float:
    return exact_choice(prediction, reference) if is_choice(reference) else token_f1(prediction, reference)


def run(
    model, tokenizer, methods: list[Method], records: list[QARecord], context: int, max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Mean score per method (exact match or F1, by record) over ``records``; ``progress(1)`` after each answer."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    scores: dict[str, list[float]] = {m.name: [] for m in methods}
    for record in records:
        doc = tokenizer(record.document, add_special_tokens=False).input_ids[: max(1, context - len(bos))]
        ctx = torch.tensor([bos + doc], dtype=torch.long)
        cue = "Answer with the option letter(s) only." if is_choice(record.answer) else "Answer briefly."
        question = torch.tensor(
            [tokenizer(f"\n\n{record.question}\n{cue}\nAnswer:", add_special_tokens=False).input_ids], dtype=torch.long
        )
        for method in methods:
            tokens, _ = answer(model, method, ctx, question, max_new_tokens)
            scores[method.name].append(score(tokenizer.decode(tokens[0], skip_special_tokens=True), record.answer))
            if progress is not None:
                progress(1)
    return {name: sum(v) / len(v) if v else 0.0 for name, v in scores.items()}
