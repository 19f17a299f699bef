"""A checkpoint that ships only a SentencePiece `tokenizer.model` (ReluLLaMA-7B, ProSparse) gets a
working tokenizer: transformers converts it with sentencepiece + protobuf, which the lock pins."""
from __future__ import annotations

import io
import json

import sentencepiece as spm

from sparse_serve.engine.text.tokenizer import Tokenizer

TEXT = ["The capital of France is Paris.", "Hello world, sparse serving is fast.",
        "Silent neurons cost nothing at all."] * 40


def test_tokenizer_model_alone_loads(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=model, vocab_size=80,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    # what Llama-2-era releases write beside it (no tokenizer.json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    tokenizer = Tokenizer.from_pretrained(str(tmp_path))
    ids = tokenizer.hf("The capital of France is Paris.").input_ids
    assert ids[0] == 1 and len(ids) > 3
    assert tokenizer.hf.decode(ids, skip_special_tokens=True) == "The capital of France is Paris."
    assert tokenizer.vocab_size == 80 and tokenizer.eos_token_id == 2
