"""The bundle's tokenizer (Hugging Face `tokenizers`) and chat template (Jinja), without transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apd_deploy.errors import BundleError, GenerationError


class BundleTokenizer:
    def __init__(self, tokenizer_json: Path, chat_template: str | None, special: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.chat_template = chat_template
        self.special = special
        self._compiled = None

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: dict[str, Any]) -> BundleTokenizer | None:
        entry = manifest["tokenizer"]
        if entry is None:
            return None
        path = bundle / entry["tokenizer_json"]
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_file = path.with_name("chat_template.jinja")
        if template is None and template_file.is_file():
            template = template_file.read_text()
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        try:
            return cls(path, template, special)
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
            raise BundleError(f"{path}: cannot load the tokenizer ({exc})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text, "the prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (a user prompt, or messages with `role` and `content`) ending
        with the template's generation prompt."""
        if not self.chat_template:
            raise GenerationError("--chat: the bundle's tokenizer has no chat template; drop --chat")
        import jinja2

        try:
            text = self._template().render(
                messages=[{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                add_generation_prompt=True, **self.special
            )
        except jinja2.TemplateError as exc:
            raise GenerationError(f"the bundle's chat template failed to render: {exc}") from None
        # The template writes the special tokens itself.
        return self.encode(text, add_special_tokens=False)

    def _template(self):
        """The chat template compiled once (a compile costs more than a render)."""
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise GenerationError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled


class TextStream:
    """The text of a growing token sequence, piece by piece, decoding only its last few tokens each
    time: decoding the whole sequence at every step makes a long generation quadratic.

    Each piece is decoded from the start of the previous piece on, so tokens whose text depends on
    the token before (a leading space, bytes of one character split over tokens) come out as in a
    decode of the whole sequence; a trailing incomplete character is held back until it completes."""

    def __init__(self, tokenizer: BundleTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the piece returned last

    def push(self, ids: list[int]) -> str | None:
        """The text `ids` add, or None while they add nothing printable yet."""
        self.ids += ids
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return None
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str | None:
        """At the end: the text held back (an incomplete last character, as a decode shows it)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] or None


def check_text(text: str, what: str) -> None:
    """Raise GenerationError naming `what` if `text` holds a lone surrogate: what Python makes of
    bytes that are not UTF-8 (a command line's, with surrogateescape), and no character a
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise GenerationError(f"{what} is not valid UTF-8 text ({found} at character {exc.start + 1}); "
                              "pass UTF-8 text") from None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content", "")
    return value or ""
