"""Calibration data: turn a recipe's ``dataset`` into packed, seeded token sequences.

Every source is read as a list of *documents* (a prompt, a file, a row). Documents are put in a
seeded order (``random.Random(seed)``) when ``shuffle_calibration_samples`` is set, tokenized one by
one, concatenated into a single token stream and cut into ``num_calibration_samples`` sequences of
exactly ``max_seq_length`` tokens. The built-in prompts are cycled (a new seeded order per pass)
when one pass is not enough; other sources are not repeated.

Tokenization of a document:

- chat messages (the built-in prompts, instruction-style .jsonl records) with a tokenizer that has a
  chat template: rendered once with ``apply_chat_template(..., tokenize=False)`` and tokenized with
  ``add_special_tokens=False`` (the template already holds BOS and role markers);
- anything else: the plain text tokenized with the tokenizer's default special tokens (e.g. BOS),
  followed by EOS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime import resources

from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_DATASETS",
    "CalibrationSet",
    "DataSourceError",
    "Document",
    "build_calibration_set",
    "hash_samples",
    "load_documents",
]

#: ``builtin:<name>`` datasets and their files in the package data ``runtime/data`` (``runtime.resources``).
BUILTIN_DATASETS: dict[str, str] = {"self-instruct": "self_instruct.jsonl"}

_INSTRUCTION_FIELDS = ("instruction", "input", "output")


class DataSourceError(ValueError):
    """The calibration data source cannot be found, read or tokenized."""


@dataclass(frozen=True)
class Document:
    """One unit of calibration text: either chat ``messages`` or plain ``text``."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


@dataclass
class CalibrationSet:
    """Packed calibration sequences and their provenance."""

    #: 1-D LongTensors; all exactly ``max_seq_length`` long unless the source was shorter than one.
    samples: list[torch.Tensor]
    #: sha256 (hex) over all samples, see :func:`hash_samples`.
    data_hash: str
    #: Human-readable description of where the tokens came from and how they were ordered.
    source: str
    #: Total number of tokens over all samples.
    num_tokens: int


# --------------------------------------------------------------------------------------------------
# reading documents


def _builtin_documents(name: str) -> list[Document]:
    """The shipped prompts of ``builtin:<name>`` as single-turn chat documents."""
    if name not in BUILTIN_DATASETS:
        raise DataSourceError(
            f"unknown built-in dataset 'builtin:{name}'; known: "
            + ", ".join(f"builtin:{key}" for key in BUILTIN_DATASETS)
        )
    resource = resources.data_file(BUILTIN_DATASETS[name])
    text = resource.read_text(encoding="utf-8")
    return [_record_to_document(record, None, f"builtin:{name}") for record in _parse_jsonl(text, f"builtin:{name}")]


def _parse_jsonl(text: str, origin: str) -> list[dict[str, Any]]:
    """Parse JSON Lines (blank lines skipped); each line must be an object."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataSourceError(f"{origin}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise DataSourceError(f"{origin}, line {number}: expected a JSON object")
        records.append(record)
    return records


def _instruction_messages(record: dict[str, Any]) -> tuple[dict[str, str], ...]:
    """User message from instruction (+ input), assistant message from output when present."""
    prompt = str(record.get("instruction") or "").strip()
    extra = str(record.get("input") or "").strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}" if prompt else extra
    messages = [{"role": "user", "content": prompt}]
    answer = str(record.get("output") or "").strip()
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return tuple(messages)


def _record_to_document(record: dict[str, Any], text_column: str | None, origin: str) -> Document:
    """A .jsonl record: ``text_column`` or ``text``, else instruction/input/output fields."""
    if text_column is not None:
        if text_column not in record:
            raise DataSourceError(f"{origin}: record has no field {text_column!r} (fields: {', '.join(record)})")
        return Document(text=str(record[text_column]))
    if "text" in record:
        return Document(text=str(record["text"]))
    if any(record.get(key) for key in _INSTRUCTION_FIELDS):
        return Document(messages=_instruction_messages(record))
    raise DataSourceError(
        f"{origin}: record has neither a 'text' field nor instruction/input/output fields "
        f"(fields: {', '.join(record)}); set text_column"
    )


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataSourceError(f"cannot read {path}: {error}") from None


def _local_documents(path: Path, text_column: str | None) -> list[Document]:
    """Documents of a .txt file (one), a folder of .txt files (one per file) or a .jsonl file (one per line)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise DataSourceError(f"folder {path} holds no .txt files")
        return [Document(text=_read_text_file(p)) for p in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(text=_read_text_file(path))]
    if suffix == ".jsonl":
        records = _parse_jsonl(_read_text_file(path), str(path))
        return [_record_to_document(record, text_column, str(path)) for record in records]
    raise DataSourceError(f"unsupported calibration file {path}: use a .txt or .jsonl file, or a folder of .txt files")


class _HubRows(Sequence[Document]):
    """Lazy view of an HF ``datasets`` split as documents."""

    def __init__(self, dataset: Any, column: str) -> None:
        self._dataset = dataset
        self._column = column

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Document:  # type: ignore[override]
        return Document(text=str(self._dataset[int(index)][self._column]))


def _hf_documents(recipe: Recipe) -> Sequence[Document]:
    """Rows of an HF datasets split (needs the optional ``datasets`` package)."""
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise DataSourceError(
            f"dataset {recipe.dataset!r} is not a local file or folder, so it would be loaded with the Hugging "
            "Face `datasets` package, which is not installed: `pip install datasets` (or kvplan[datasets]), "
            "or pass a local .txt/.jsonl file or folder of .txt files"
        ) from None
    try:
        split = datasets.load_dataset(recipe.dataset, recipe.dataset_config, split=recipe.splits)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise DataSourceError(f"cannot load dataset {recipe.dataset!r} (split {recipe.splits!r}): {error}") from error
    column = recipe.text_column or "text"
    if column not in split.column_names:
        raise DataSourceError(
            f"dataset {recipe.dataset!r} has no column {column!r} "
            f"(columns: {', '.join(split.column_names)}); set text_column"
        )
    return _HubRows(split, column)


def _looks_like_path(dataset: str) -> bool:
    """Strings that can only mean a local path (so a missing file is an error, not an HF name)."""
    return dataset.startswith((".", "/", "~")) or dataset.lower().endswith((".txt", ".jsonl", ".json"))


def load_documents(recipe: Recipe) -> tuple[Sequence[Document], str]:
    """The recipe's documents and a short description of the source.

    Raises:
        DataSourceError: the source is unknown, missing or unreadable.
    """
    dataset = recipe.dataset
    if dataset.startswith("builtin:"):
        return _builtin_documents(dataset.split(":", 1)[1]), dataset
    path = Path(dataset).expanduser()
    if path.exists():
        return _local_documents(path, recipe.text_column), str(path)
    if _looks_like_path(dataset):
        raise DataSourceError(f"calibration data not found: {path}")
    description = (
        f"hf:{dataset}" + (f"/{recipe.dataset_config}" if recipe.dataset_config else "") + f"[{recipe.splits}]"
    )
    return _hf_documents(recipe), description


# --------------------------------------------------------------------------------------------------
# tokenizing and packing


def _tokenize_document(tokenizer: Any, document: Document) -> list[int]:
    """Token ids of one document (see the module docstring for the rules)."""
    if document.messages is not None and getattr(tokenizer, "chat_template", None):
        add_generation_prompt = document.messages[-1]["role"] != "assistant"
        rendered = tokenizer.apply_chat_template(
            list(document.messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if document.messages is not None:
        text = "\n\n".join(message["content"] for message in document.messages)
    else:
        text = document.text or ""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids


def _document_order(count: int, rng: random.Random | None) -> list[int]:
    """Indices 0..count-1, shuffled when an rng is given."""
    order = list(range(count))
    if rng is not None:
        rng.shuffle(order)
    return order


class _TokenStream:
    """Tokens of all documents in (seeded) order; with ``cycle``, again in a new order each pass.

    ``passes`` counts the passes started so far (to report how often the documents were cycled).
    """

    def __init__(
        self,
        documents: Sequence[Document],
        tokenize: Callable[[Document], list[int]],
        *,
        rng: random.Random | None,
        cycle: bool,
    ) -> None:
        self._documents = documents
        self._tokenize = tokenize
        self._rng = rng
        self._cycle = cycle
        self.passes = 0

    def __iter__(self) -> Iterator[int]:
        while True:
            self.passes += 1
            produced = False
            for index in _document_order(len(self._documents), self._rng):
                ids = self._tokenize(self._documents[index])
                produced = produced or bool(ids)
                yield from ids
            if not self._cycle or not produced:
                return


def _pack(stream: Iterable[int], length: int, count: int, progress_bar: Any) -> list[list[int]]:
    """Cut up to ``count`` sequences of ``length`` tokens from ``stream``; keep a short tail only if nothing else."""
    samples: list[list[int]] = []
    current: list[int] = []
    for token in stream:
        current.append(token)
        if len(current) == length:
            samples.append(current)
            progress_bar.update(1)
            current = []
            if len(samples) == count:
                break
    if not samples and current:
        samples.append(current)
    return samples


def hash_samples(samples: Sequence[torch.Tensor]) -> str:
    """sha256 (hex) over the samples: for each, its length then its ids, as little-endian int64."""
    digest = hashlib.sha256()
    for sample in samples:
        ids = sample.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
    return digest.hexdigest()


def _describe(base: str, recipe: Recipe, documents: int, passes: int, templated: bool, cycle: bool) -> str:
    """Text for ``CalibrationSet.source``."""
    order = f"shuffled (seed={recipe.seed})" if recipe.shuffle_calibration_samples else "in file order"
    parts = [f"{documents} documents", "chat template" if templated else "plain text + EOS", order]
    if cycle and passes > 1:
        parts.append(f"cycled: {passes} passes over the documents, a new seeded order each")
    parts.append(f"packed into sequences of {recipe.max_seq_length} tokens")
    return f"{base} ({'; '.join(parts)})"


def build_calibration_set(tokenizer: Any, recipe: Recipe, *, progress: bool = True) -> CalibrationSet:
    """Build the recipe's calibration sequences with ``tokenizer``.

    The same tokenizer, source, recipe fields and seed always give the same samples and hash.

    Raises:
        DataSourceError: the source is missing, unreadable or yields no tokens.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415  (keeps import of this module light)

    documents, base = load_documents(recipe)
    if len(documents) == 0:
        raise DataSourceError(f"calibration source {base} holds no documents")
    cycle = recipe.dataset.startswith("builtin:")
    rng = random.Random(recipe.seed) if recipe.shuffle_calibration_samples else None
    stream = _TokenStream(documents, lambda doc: _tokenize_document(tokenizer, doc), rng=rng, cycle=cycle)
    with tqdm(
        total=recipe.num_calibration_samples, desc="Tokenizing calibration data", unit="seq", disable=not progress
    ) as bar:
        packed = _pack(stream, recipe.max_seq_length, recipe.num_calibration_samples, bar)
    if not packed:
        raise DataSourceError(f"calibration source {base} produced no tokens")
    _warn_if_short(packed, recipe, base)
    samples = [torch.tensor(ids, dtype=torch.long) for ids in packed]
    templated = bool(getattr(tokenizer, "chat_template", None)) and any(
        doc.messages is not None for doc in _first(documents)
    )
    return CalibrationSet(
        samples=samples,
        data_hash=hash_samples(samples),
        source=_describe(base, recipe, len(documents), stream.passes, templated, cycle),
        num_tokens=sum(len(ids) for ids in packed),
    )


def _first(documents: Sequence[Document], count: int = 1) -> list[Document]:
    """The first ``count`` documents (for cheap checks on the source's kind)."""
    return [documents[i] for i in range(min(count, len(documents)))]


def _warn_if_short(packed: list[list[int]], recipe: Recipe, base: str) -> None:
    """Warn when the source could not fill the requested samples."""
    if len(packed) == 1 and len(packed[0]) < recipe.max_seq_length:
        message = (
            f"calibration source {base} holds only {len(packed[0])} tokens, fewer than one sample of "
            f"max_seq_length={recipe.max_seq_length}; using one shorter sample"
        )
    elif len(packed) < recipe.num_calibration_samples:
        message = (
            f"calibration source {base} filled only {len(packed)} of {recipe.num_calibration_samples} "
            f"samples of {recipe.max_seq_length} tokens"
        )
    else:
        return
    logger.warning(message)
