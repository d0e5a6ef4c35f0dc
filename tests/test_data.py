"""Calibration data: packing, determinism, chat-template handling and the supported sources."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

import make_tiny_model
from calibrate.data import DataSourceError, build_calibration_set, hash_samples, load_documents
from calibrate.recipe import Recipe

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
CORPUS = [
    "Write a short poem about the sea and the sky.",
    "Explain how a cache works, then give an example in Python code.",
    "The quick brown fox jumps over the lazy dog; 1234567890!?",
    "Classify the sentiment of the sentence: I loved the movie.",
] * 5


def make_tokenizer(*, chat_template: str | None = CHAT_TEMPLATE):
    """A small byte-level BPE tokenizer trained in memory on this file's corpus (no downloads)."""
    return make_tiny_model.make_tokenizer(CORPUS, chat_template)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer(chat_template=None)


def small_recipe(**overrides) -> Recipe:
    return Recipe(model="org/name", num_calibration_samples=3, max_seq_length=128).with_overrides(**overrides)


# ---------------------------------------------------------------------------------------- built-in prompts


def test_builtin_packs_exact_lengths(tokenizer) -> None:
    result = build_calibration_set(tokenizer, small_recipe(), progress=False)
    assert len(result.samples) == 3
    for sample in result.samples:
        assert sample.dtype == torch.long and sample.dim() == 1 and sample.numel() == 128
    assert result.num_tokens == 3 * 128
    assert len(result.data_hash) == 64 and result.data_hash == hash_samples(result.samples)
    assert result.source.startswith("builtin:self-instruct (427 documents; chat template; shuffled (seed=42)")


def test_same_seed_same_samples_other_seed_other_order(tokenizer) -> None:
    first = build_calibration_set(tokenizer, small_recipe(), progress=False)
    again = build_calibration_set(tokenizer, small_recipe(), progress=False)
    other = build_calibration_set(tokenizer, small_recipe(seed=43), progress=False)
    assert first.data_hash == again.data_hash
    assert all(torch.equal(a, b) for a, b in zip(first.samples, again.samples, strict=True))
    assert other.data_hash != first.data_hash


def test_unshuffled_order_ignores_seed_and_follows_the_file(tokenizer) -> None:
    a = build_calibration_set(tokenizer, small_recipe(shuffle_calibration_samples=False, seed=1), progress=False)
    b = build_calibration_set(tokenizer, small_recipe(shuffle_calibration_samples=False, seed=2), progress=False)
    assert a.data_hash == b.data_hash
    assert "in file order" in a.source
    text = tokenizer.decode(a.samples[0])
    assert text.startswith("<s>user: Is there anything I can eat for a breakfast")


def test_chat_template_vs_plain_text(tokenizer, plain_tokenizer) -> None:
    recipe = small_recipe(shuffle_calibration_samples=False, num_calibration_samples=1, max_seq_length=512)
    templated = tokenizer.decode(build_calibration_set(tokenizer, recipe, progress=False).samples[0])
    plain_set = build_calibration_set(plain_tokenizer, recipe, progress=False)
    plain = plain_tokenizer.decode(plain_set.samples[0])
    assert "<s>user: " in templated and "</s><s>assistant: " in templated
    assert "user:" not in plain and "assistant:" not in plain
    assert plain.startswith("Is there anything I can eat for a breakfast")
    assert "calories?</s>What is the relation between the given pairs?\n\nNight : Day" in plain
    assert "plain text + EOS" in plain_set.source


def test_builtin_prompts_cycle_when_exhausted(tokenizer) -> None:
    one_pass = sum(len(ids) for ids in _all_builtin_token_counts(tokenizer))
    length = 1024
    count = one_pass // length + 3
    result = build_calibration_set(
        tokenizer, small_recipe(num_calibration_samples=count, max_seq_length=length), progress=False
    )
    assert len(result.samples) == count and all(s.numel() == length for s in result.samples)
    assert "cycled: 2 passes" in result.source


def _all_builtin_token_counts(tokenizer) -> list[list[int]]:
    from calibrate.data import _tokenize_document

    documents, _ = load_documents(small_recipe())
    return [_tokenize_document(tokenizer, documents[i]) for i in range(len(documents))]


def test_unknown_builtin() -> None:
    with pytest.raises(DataSourceError, match="unknown built-in dataset 'builtin:alpaca'"):
        load_documents(small_recipe(dataset="builtin:alpaca"))


# ---------------------------------------------------------------------------------------- local sources


def test_txt_file_packs_and_drops_short_tail(tmp_path: Path, plain_tokenizer) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(CORPUS * 4), encoding="utf-8")
    total = len(plain_tokenizer(path.read_text(encoding="utf-8"))["input_ids"]) + 1  # + EOS
    length = total // 3
    result = build_calibration_set(
        plain_tokenizer,
        small_recipe(dataset=str(path), max_seq_length=length, num_calibration_samples=10),
        progress=False,
    )
    assert len(result.samples) == 3 and all(s.numel() == length for s in result.samples)
    assert result.source.startswith(str(path))


def test_source_shorter_than_one_sample_gives_one_short_sample_and_warns(
    tmp_path: Path, plain_tokenizer, caplog
) -> None:
    path = tmp_path / "short.txt"
    path.write_text("hello world", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="calibrate.data"):
        result = build_calibration_set(plain_tokenizer, small_recipe(dataset=str(path)), progress=False)
    assert len(result.samples) == 1 and 0 < result.samples[0].numel() < 128
    assert result.samples[0][-1].item() == plain_tokenizer.eos_token_id
    assert "fewer than one sample" in caplog.text


def test_fewer_full_samples_than_requested_warns(tmp_path: Path, plain_tokenizer, caplog) -> None:
    path = tmp_path / "c.txt"
    path.write_text(" ".join(CORPUS), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="calibrate.data"):
        result = build_calibration_set(
            plain_tokenizer,
            small_recipe(dataset=str(path), max_seq_length=32, num_calibration_samples=1000),
            progress=False,
        )
    assert 1 < len(result.samples) < 1000
    assert f"filled only {len(result.samples)} of 1000" in caplog.text


def test_folder_of_txt_in_sorted_order(tmp_path: Path, plain_tokenizer) -> None:
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    result = build_calibration_set(
        plain_tokenizer, small_recipe(dataset=str(tmp_path), shuffle_calibration_samples=False), progress=False
    )
    assert plain_tokenizer.decode(result.samples[0]) == "first file</s>second file</s>"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="holds no .txt files"):
        load_documents(small_recipe(dataset=str(empty)))


def test_jsonl_text_field_text_column_and_instruction_fields(tmp_path: Path, tokenizer) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "\n".join(json.dumps({"text": t, "body": t.upper()}) for t in ["alpha", "beta"]) + "\n\n", encoding="utf-8"
    )
    plain = build_calibration_set(
        tokenizer, small_recipe(dataset=str(texts), shuffle_calibration_samples=False), progress=False
    )
    assert tokenizer.decode(plain.samples[0]) == "alpha</s>beta</s>"
    column = build_calibration_set(
        tokenizer,
        small_recipe(dataset=str(texts), text_column="body", shuffle_calibration_samples=False),
        progress=False,
    )
    assert tokenizer.decode(column.samples[0]) == "ALPHA</s>BETA</s>"

    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"instruction": "Add", "input": "2+2", "output": "4"})
        + "\n"
        + json.dumps({"instruction": "Hi"})
        + "\n",
        encoding="utf-8",
    )
    chat = build_calibration_set(
        tokenizer, small_recipe(dataset=str(chats), shuffle_calibration_samples=False), progress=False
    )
    assert (
        tokenizer.decode(chat.samples[0]) == "<s>user: Add\n\n2+2</s><s>assistant: 4</s><s>user: Hi</s><s>assistant: "
    )


def test_jsonl_errors(tmp_path: Path, tokenizer) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match="line 2: not valid JSON"):
        load_documents(small_recipe(dataset=str(bad)))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "why"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match="neither a 'text' field"):
        load_documents(small_recipe(dataset=str(odd)))
    with pytest.raises(DataSourceError, match="no field 'body'"):
        load_documents(small_recipe(dataset=str(odd), text_column="body"))


def test_missing_local_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="calibration data not found"):
        load_documents(small_recipe(dataset=str(tmp_path / "missing.jsonl")))


def test_hf_dataset_without_datasets_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataSourceError) as info:
        build_calibration_set(
            tokenizer, small_recipe(dataset="wikitext", dataset_config="wikitext-2-raw-v1"), progress=False
        )
    message = str(info.value)
    assert "pip install datasets" in message and "local .txt/.jsonl file" in message


def test_hash_covers_sample_boundaries() -> None:
    a = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    b = [torch.tensor([1, 2]), torch.tensor([3, 4])]
    assert hash_samples(a) != hash_samples(b)
    assert hash_samples(a) == hash_samples([t.clone() for t in a])
