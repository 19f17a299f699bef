"""Incremental detokenizer: agreement with full decodes, UTF-8 hold-back, stop strings.

Three real tokenizers are trained in-process (no downloads): byte-level BPE (GPT-2 style),
Llama-style BPE with "▁" spaces and byte fallback, and a Metaspace Unigram (SentencePiece
style). Each splits emoji/CJK characters over several tokens somewhere.
"""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.text.detokenizer import IncrementalDetokenizer
from sparse_serve.engine.text.tokenizer import Tokenizer

CORPUS = [
    "Hello world! How are you doing today?",
    "The quick brown fox 🦊 jumps over the lazy dog 🐶.",
    "你好，世界。今天天气很好。",
    "日本語のテキストです。",
    "Café naïve déjà vu, señor. Ünïcödé is fun.",
    "emoji party 🎉🎉 with family 👩‍👩‍👧 and food 🍕🍣",
    "STOP here. Stop there: the end is near, the END.",
] * 3
SPECIALS = ["<unk>", "<s>", "</s>"]
TEXTS = [
    "Hello world, the fox 🦊 says 你好 and 日本語!",
    "Stop there: café 🍕🍣 déjà vu. The END.",
    "  leading spaces and   gaps 👩‍👩‍👧 end",
]


def _wrap(raw: RawTokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=350, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(raw)


def _llama_style_bpe() -> PreTrainedTokenizerFast:
    """"▁" for spaces, rare characters fall back to <0xNN> byte tokens, decoder strips the
    first space (as Llama/Mistral tokenizer.json files do)."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = RawTokenizer(models.BPE())
    base.normalizer = normalizer
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=220, special_tokens=SPECIALS, limit_alphabet=45))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                  byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizer
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens(SPECIALS)
    return _wrap(raw)


def _metaspace_unigram() -> PreTrainedTokenizerFast:
    raw = RawTokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=250, special_tokens=SPECIALS, unk_token="<unk>"))
    return _wrap(raw)


@pytest.fixture(scope="module", params=["byte_level_bpe", "llama_style_bpe",
                                        "metaspace_unigram"])
def hf(request) -> PreTrainedTokenizerFast:
    return {"byte_level_bpe": _byte_level_bpe, "llama_style_bpe": _llama_style_bpe,
            "metaspace_unigram": _metaspace_unigram}[request.param]()


def _decode(hf, ids, skip=True) -> str:
    return hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _stream(hf, prompt_ids, output_ids, params=None, chunk=1):
    """Feeds output_ids in chunks; returns (deltas, stop match, flushed text, detokenizer)."""
    detok = IncrementalDetokenizer(hf, prompt_ids, params or SamplingParams())
    deltas, match = [], None
    for start in range(0, len(output_ids), chunk):
        delta, match = detok.add_tokens(output_ids[start:start + chunk])
        deltas.append(delta)
        if match is not None:
            break
    flushed = detok.flush() if match is None else ""
    return deltas, match, flushed, detok


def test_real_texts_match_full_decode_and_never_emit_half_characters(hf):
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        deltas, match, flushed, detok = _stream(hf, [], ids)
        full = _decode(hf, ids)
        assert "\ufffd" not in full
        assert match is None and flushed == ""
        assert "".join(deltas) == full == detok.output_text
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("build", [_byte_level_bpe, _llama_style_bpe])
def test_text_split_over_tokens_is_held_until_complete(build):
    # "🐙" is not in the training corpus: byte-level and byte-fallback vocabularies spell it
    # with its four UTF-8 bytes (the Unigram one has no byte fallback: it would be <unk>).
    hf = build()
    ids = hf.encode("🐙", add_special_tokens=False)
    ids = [i for i in ids if _decode(hf, [i]).strip()]   # drop a bare leading "▁"
    assert len(ids) > 1
    detok = IncrementalDetokenizer(hf, [], SamplingParams())
    partial = [detok.add_tokens([i])[0] for i in ids]
    assert all(p == "" for p in partial[:-1])
    assert partial[-1].strip() == "🐙"


_UNSEEN_CHARS = "🐙🚀€ß語ñ한글Ω"


def _random_ids(hf, rng: random.Random, length: int) -> list[int]:
    """Random token ids. NOTE: for byte-fallback vocabularies, <0xNN> tokens are only drawn
    as complete UTF-8 characters: tokenizers' ByteFallback decoder turns a whole run of byte
    tokens into one U+FFFD per token when the run is invalid, even bytes it already showed
    as valid text, so no incremental decoder can agree with a full decode of random bytes.
    Byte-level BPE decodes any byte soup consistently and gets fully random ids."""
    byte_token_ids = {i for t, i in hf.get_vocab().items() if t.startswith("<0x")}
    if not byte_token_ids:
        return [rng.randrange(len(hf)) for _ in range(length)]
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.2:
            char_ids = hf.encode(rng.choice(_UNSEEN_CHARS), add_special_tokens=False)
            ids.extend(i for i in char_ids if i in byte_token_ids)
        else:
            token_id = rng.randrange(len(hf))
            if token_id not in byte_token_ids:
                ids.append(token_id)
    return ids


@pytest.mark.parametrize("chunk", [1, 3])
def test_random_token_sequences_concatenate_to_full_decode(hf, chunk):
    rng = random.Random(1234)
    for _ in range(40):
        ids = _random_ids(hf, rng, rng.randint(1, 30))
        deltas, _, flushed, detok = _stream(hf, [], ids, chunk=chunk)
        full = _decode(hf, ids)
        assert "".join(deltas) + flushed == full
        assert detok.output_text == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_prompt_context_keeps_first_token_spacing(hf):
    rng = random.Random(7)
    for prompt_text in TEXTS:
        prompt_ids = hf.encode(prompt_text, add_special_tokens=False)
        for _ in range(10):
            output_ids = hf.encode(rng.choice(TEXTS), add_special_tokens=False)[:12]
            output_ids += _random_ids(hf, rng, rng.randint(0, 8))
            deltas, _, flushed, _ = _stream(hf, prompt_ids, output_ids)
            prompt_text_decoded = _decode(hf, prompt_ids)
            full = _decode(hf, prompt_ids + output_ids)
            assert full.startswith(prompt_text_decoded)
            assert "".join(deltas) + flushed == full[len(prompt_text_decoded):]


def test_sentencepiece_word_after_prompt_starts_with_space():
    hf = _metaspace_unigram()
    prompt_ids = hf.encode("Hello", add_special_tokens=False)
    output_ids = hf.encode(" world", add_special_tokens=False)
    deltas, _, _, _ = _stream(hf, prompt_ids, output_ids)
    assert "".join(deltas) == " world"
    # without context the first word has no space, exactly like a full decode
    deltas, _, _, _ = _stream(hf, [], output_ids)
    assert "".join(deltas) == "world"


def test_skip_special_tokens_honoured(hf):
    eos = hf.eos_token_id
    ids = hf.encode("Hello world", add_special_tokens=False)
    with_special = ids[:2] + [eos] + ids[2:]
    deltas, _, flushed, _ = _stream(hf, [], with_special)
    assert "".join(deltas) + flushed == _decode(hf, with_special) == _decode(hf, ids)
    deltas, _, flushed, _ = _stream(hf, [], with_special,
                                    SamplingParams(skip_special_tokens=False))
    text = "".join(deltas) + flushed
    assert "</s>" in text and text == _decode(hf, with_special, skip=False)


def _params(*stops: str) -> SamplingParams:
    return SamplingParams(stop=list(stops))


def test_stop_string_spanning_tokens_is_cut(hf):
    text = "Hello world, the fox 🦊 says 你好 and 日本語!"
    ids = hf.encode(text, add_special_tokens=False)
    for stop in ["fox 🦊", "says", "你好", "d, th", "!"]:
        deltas, match, flushed, detok = _stream(hf, [], ids, _params(stop))
        expected = text[:text.index(stop)]
        assert match == stop
        assert "".join(deltas) == expected == detok.output_text
        assert flushed == ""
        assert detok.add_tokens(ids[:2]) == ("", None)   # finished: nothing more


def test_earliest_of_several_stop_strings_wins(hf):
    text = "Stop there: café 🍕🍣 déjà vu. The END."
    ids = hf.encode(text, add_special_tokens=False)
    deltas, match, _, _ = _stream(hf, [], ids, _params("END", "vu.", "🍣"), chunk=len(ids))
    assert match == "🍣"
    assert "".join(deltas) == "Stop there: café 🍕"


def test_possible_stop_prefix_is_held_then_released(hf):
    text = "The END."
    ids = hf.encode(text, add_special_tokens=False)
    # "END." never completes "END!!": "END." cannot start it, so only "E","EN","END" holds.
    detok = IncrementalDetokenizer(hf, [], _params("END!!", "."))
    emitted = []
    for i in ids:
        delta, match = detok.add_tokens([i])
        emitted.append(delta)
        if match:
            break
    assert match == "."
    assert "".join(emitted) == "The END"
    # A tail that might still grow into a stop string waits for flush().
    ids = hf.encode("The EN", add_special_tokens=False)
    deltas, match, flushed, detok = _stream(hf, [], ids, _params("END!!"))
    assert match is None
    assert "".join(deltas) == "The "
    assert flushed == "EN"
    assert detok.output_text == "The EN"


def test_stop_string_at_start_returns_nothing(hf):
    ids = hf.encode("Hello world", add_special_tokens=False)
    deltas, match, _, detok = _stream(hf, [], ids, _params("Hel"))
    assert match == "Hel" and "".join(deltas) == "" and detok.output_text == ""


def test_works_with_engine_tokenizer_wrapper():
    hf = _byte_level_bpe()
    wrapped = Tokenizer(hf)
    ids = wrapped.encode("fox 🦊 dog", add_special_tokens=False)
    deltas, _, flushed, _ = _stream(wrapped, [], ids)
    assert "".join(deltas) + flushed == wrapped.decode(ids) == "fox 🦊 dog"
