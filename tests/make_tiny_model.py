"""Write a tiny random-weight Llama and a small BPE tokenizer (with a chat template) to a folder; no downloads.

    python tests/make_tiny_model.py OUT_DIR [--layers 4] [--seed 0]

CI uses it to calibrate a plan from an installed wheel (outside the checkout), so it imports only torch,
tokenizers and transformers, never kvplan or the tests. The folder loads with ``from_pretrained`` and with
``python -m calibrate OUT_DIR ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
CORPUS = [
    "Write a short poem about the sea and the sky.",
    "Explain how a cache works, then give an example in Python code.",
    "The quick brown fox jumps over the lazy dog; 1234567890!?",
    "Classify the sentiment of the sentence: I loved the movie.",
    "Summarize the following paragraph in one sentence, then list three keywords.",
] * 5


def train_backend(corpus=CORPUS, vocab_size: int = 400):
    """A byte-level BPE tokenizer backend (``tokenizers``) with ``<unk> <s> </s>``, trained in memory on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    return backend


def make_tokenizer(corpus=CORPUS, chat_template: str | None = CHAT_TEMPLATE):
    """A transformers tokenizer over :func:`train_backend` (vocab 400), with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_backend(corpus), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_model(out: Path, *, layers: int = 4, seed: int = 0, tokenizer=None) -> Path:
    """Save a random Llama (seeded) and ``tokenizer`` (default :func:`make_tokenizer`) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (created if missing)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = make_tiny_model(args.out, layers=args.layers, seed=args.seed)
    print(f"tiny model written to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
