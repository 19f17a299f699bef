"""Tokenizer + chat template wrapper around a local transformers fast tokenizer (no torch).

Chat templates come from model folders, i.e. from strangers: they are rendered in Jinja's
ImmutableSandboxedEnvironment (no dunder attribute access, no mutation of passed objects),
never with a plain Environment.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sparse_serve.engine.core.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Files any one of which makes a folder loadable by AutoTokenizer as a fast tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class ChatTemplateError(ValueError):
    """No chat template, or the template failed to render (the server answers 400)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # NOTE: Jinja's own tojson HTML-escapes <, >, & and ' which chat templates must not do.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    # Same whitespace settings as transformers, so templates render as their authors saw.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


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
        self._compiled: jinja2.Template | None = None
        self._adds_bos = self._detect_adds_bos()

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._chat_template is None:
            raise ChatTemplateError(
                "this model's tokenizer has no chat template; use the completions endpoint or "
                "start the server with a chat template file")
        if self._compiled is None:
            try:
                self._compiled = _make_environment().from_string(self._chat_template)
            except jinja2.TemplateError as exc:
                raise ChatTemplateError(f"invalid chat template: {exc}") from exc
        special = {name: getattr(self.hf, name, None) for name in
                   ("bos_token", "eos_token", "unk_token", "pad_token")}
        try:
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **{k: (v if v is not None else "")
                                            for k, v in special.items()})
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            # SecurityError (sandbox violation) is a TemplateError too.
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Renders and encodes a conversation with exactly one BOS where the tokenizer wants one.

        Templates usually write the BOS text themselves; encoding with special tokens would
        then add a second one. So: encode without special tokens, and prepend BOS only when
        this tokenizer normally adds one and the template did not.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = self.encode(prompt, add_special_tokens=False)
        if self._adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
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
