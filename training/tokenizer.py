"""The demo pair's tokenizer: whole words, single digits, punctuation; spaces kept on the pieces.

Digits are single tokens so that the models do arithmetic digit by digit. Built with the
`tokenizers` library; the bundle and the runtime load it like any Hugging Face tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

EOS, USER, ASSISTANT, MASK, UNK = "<|endoftext|>", "<|user|>", "<|assistant|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = (EOS, USER, ASSISTANT, MASK, UNK)
PIECES = r" ?[A-Za-z]+| ?\d|\s*[^\sA-Za-z\d]|\s+"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: Iterable[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    splitter = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    pieces = {f"{space}{digit}" for space in ("", " ") for digit in "0123456789"}
    for text in texts:
        pieces.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS, "pad_token": EOS,
              "mask_token": MASK, "unk_token": UNK, "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
