"""A tiny tokenizer in the Llama / Mistral layout the sparse families ship: <unk> <s> </s> at
ids 0-2, the 256 byte-fallback tokens <0x00>..<0xFF>, BPE merges over "▁"-marked words, then
any added special tokens (TurboSparse adds <|im_end|> = base size, <|im_start|> = base + 1).
Written as tokenizer.json + tokenizer_config.json with `tokenizer_class: LlamaTokenizer`, as the
published folders are.
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = ["The capital of France is Paris.", "Hello world, hello sparse serving!",
          "Neurons that are silent cost nothing.", "def main():\n    return 0"] * 20


def write_llama_tokenizer(folder: Path, *, eos_token: str = "</s>", added: tuple[str, ...] = (),
                          chat_template: str | None = None, num_merges: int = 120) -> int:
    """Write the tokenizer files; returns the number of tokens (base vocabulary + added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = metaspace
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=num_merges + 60, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                               fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", *added)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": eos_token,
              "unk_token": "<unk>", "pad_token": "<unk>" if added else None, "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 32768,
              "tokenizer_class": "LlamaTokenizer"}
    if added:
        config["additional_special_tokens"] = [t for t in added if t != eos_token]
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": eos_token, "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)
