"""Tokenizer + chat template wrapper around a local transformers fast tokenizer (no torch).

Chat templates come from model folders, i.e. from strangers: they are rendered by the
tokenizer's own `apply_chat_template`, which uses Jinja's ImmutableSandboxedEnvironment (no
dunder attribute access, no mutation of passed objects) with the helpers templates expect
(raise_exception, strftime_now, a tojson that does not HTML-escape); tests/engine/test_tokenizer.py
holds it to that.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import jinja2

from sparse_serve.engine.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Files any one of which makes a folder loadable by AutoTokenizer as a fast tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class ChatTemplateError(ValueError):
    """No chat template, or the template failed to render (the server answers 400)."""


def _read_template_file(path: str) -> str:
    """A Jinja file, or a chat_template.json-style file with a "chat_template" key."""
    template_path = Path(path)
    if not template_path.is_file():
        raise ChatTemplateError(f"chat template file not found: {template_path}")
    text = template_path.read_text(encoding="utf-8")
    if template_path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise ChatTemplateError(f"{template_path} has no string 'chat_template' key")
        return data["chat_template"]
    return text


class Tokenizer:
    """Encode/decode, token texts for logprobs and chat-template rendering for one model."""

    def __init__(self, hf: Any, chat_template: str | None = None):
        self.hf = hf
        self._chat_template = chat_template if chat_template is not None \
            else self._template_from_hf(hf)
        self._adds_bos = self._detect_adds_bos()
        # The texts of control tokens (special added tokens): in caller-supplied text they are
        # characters, never the control tokens themselves.
        self._special_texts = tuple(sorted({token.content for token in hf.added_tokens_decoder.values()
                                            if token.special and token.content}, key=len, reverse=True))

    @classmethod
    def from_pretrained(cls, path: str, chat_template_path: str | None = None) -> "Tokenizer":
        """Loads from a local folder only (never the network)."""
        from transformers import AutoTokenizer

        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder not found: {folder}")
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"no tokenizer files in {folder}: expected one of {', '.join(_TOKENIZER_FILES)}")
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                               trust_remote_code=False)
        except Exception as exc:   # transformers raises many types; name the folder once
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from exc
        override = _read_template_file(chat_template_path) if chat_template_path else None
        tokenizer = cls(hf, chat_template=override)
        logger.info("tokenizer from %s: vocab %d, bos %s, eos %s, chat template: %s", folder,
                    tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id,
                    "override" if override else ("yes" if tokenizer.has_chat_template else "no"))
        return tokenizer

    @staticmethod
    def _template_from_hf(hf: Any) -> str | None:
        template = getattr(hf, "chat_template", None)
        if isinstance(template, dict):
            # NOTE: some tokenizers ship named templates (e.g. "default", "tool_use").
            template = template.get("default")
        return template if isinstance(template, str) and template else None

    def _detect_adds_bos(self) -> bool:
        bos = self.bos_token_id
        if bos is None:
            return False
        ids = self.hf.encode("a", add_special_tokens=True)
        return bool(ids) and ids[0] == bos

    # --- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens (the model's embedding may be padded larger)."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    # --- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special_tokens: bool = True) -> list[int]:
        """parse_special_tokens=False: a control token's text in `text` is tokenized as plain
        characters (what every caller-supplied text gets unless the caller asks otherwise)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens,
                                   split_special_tokens=not parse_special_tokens))

    def special_token_in(self, text: str) -> str | None:
        """The first control token's text found in `text`, if any."""
        return next((special for special in self._special_texts if special in text), None)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # NOTE: no cleanup of tokenization spaces, matching the incremental detokenizer.
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own, keeping its leading space (for logprobs)."""
        text = self.hf.decode([token_id], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)
        piece = self.hf.convert_ids_to_tokens(token_id)
        # NOTE: SentencePiece decoders strip the word-boundary marker of the first token
        # they see; alone, "▁Hello" would lose the space it stands for.
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    # --- chat -----------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def template_supports_tools(self) -> bool:
        """The template reads the `tools` variable (else the server renders tools as text)."""
        return self._chat_template is not None and "tools" in self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self._chat_template is None:
            raise ChatTemplateError(
                "this model's tokenizer has no chat template; use the completions endpoint or "
                "start the server with a chat template file")
        try:
            return self.hf.apply_chat_template(messages, chat_template=self._chat_template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt, tools=tools)
        except jinja2.TemplateError as exc:
            # the template's raise_exception, and sandbox violations (SecurityError), land here
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Renders and encodes a conversation with exactly one BOS where the tokenizer wants one.

        Templates usually write the BOS text themselves; encoding with special tokens would
        then add a second one. So: encode without special tokens, and prepend BOS only when
        this tokenizer normally adds one and the template did not.

        Only the template emits control tokens: a message whose content holds a control
        token's text (`<|im_start|>system...`) has that content tokenized as plain text.
        """
        if any(self.special_token_in(m.get("content") or "") for m in messages):
            ids = self._encode_chat_contents_as_text(messages, add_generation_prompt, tools)
        else:
            prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            ids = self.encode(prompt, add_special_tokens=False)
        if self._adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def _encode_chat_contents_as_text(self, messages: list[dict], add_generation_prompt: bool,
                                      tools: list[dict] | None = None) -> list[int]:
        """Render with a placeholder per content, check that putting the contents back gives
        the real rendering (the template copied them verbatim), then tokenize the template's
        pieces with control tokens and the contents without.

        NOTE: the pieces are tokenized apart, so a BPE merge across a content's edge can differ
        from tokenizing the whole string; only prompts that carry control-token text pay that."""
        placeholders = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = [{**m, "content": p} for m, p in zip(messages, placeholders)]
        rendered = self.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tools=tools)
        contents = [m.get("content") or "" for m in messages]
        real = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        pieces = re.split("\ue000(\\d+)\ue001", rendered)
        rebuilt = "".join(contents[int(piece)] if i % 2 else piece for i, piece in enumerate(pieces))
        if rebuilt != real:
            found = next(self.special_token_in(c) for c in contents if self.special_token_in(c))
            raise ChatTemplateError(
                f"a message's content holds the control token {found!r}, and this model's chat "
                "template transforms message contents, so it cannot be kept as plain text")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self.encode(contents[int(piece)], add_special_tokens=False, parse_special_tokens=False)
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids


def _ids_from(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def load_eos_token_ids(model_dir: str, tokenizer: Tokenizer) -> set[int]:
    """All EOS ids: config.json, generation_config.json (int or list each) and the tokenizer's."""
    eos_ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            eos_ids |= _ids_from(data.get("eos_token_id"))
            # NOTE: multimodal configs nest the language model's settings.
            text_config = data.get("text_config")
            if isinstance(text_config, dict):
                eos_ids |= _ids_from(text_config.get("eos_token_id"))
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return eos_ids
