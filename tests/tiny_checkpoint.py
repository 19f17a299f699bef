"""Tiny random checkpoints written by transformers' own save_pretrained, for tests.

Each checkpoint is a real HF-style folder: config.json, model.safetensors, a byte-level BPE
tokenizer with a chat template, generation_config.json. dReLU (Bamboo) and FATReLU checkpoints
are written as Llama and then relabelled in config.json, since transformers has no such classes;
tests patch the reference MLP to match.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def write_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> int:
    """A byte-level BPE over the 256 bytes plus a few merges; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The capital of France is Paris.", "Hello world, hello sparse serving!",
              "Neurons that are silent cost nothing. 東京 café 🚀"] * 20
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(folder)
    return len(hf)


def make_tiny_checkpoint(folder: str | Path, act: str = "silu", *, predictor_rank: int | None = None,
                         sliding_window: int | None = None, tie_word_embeddings: bool = False,
                         num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 128,
                         num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0,
                         act_threshold: float = 0.05, chat_template: str | None = CHAT_TEMPLATE,
                         max_position_embeddings: int = 512) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder, chat_template)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2, hidden_act="silu" if act == "silu" else "relu")
    if sliding_window is not None:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    _spread_weights(model)
    model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if act == "drelu":
        cfg.update(architectures=["BambooForCausalLM"], model_type="bamboo", hidden_act="relu")
    elif act == "fatrelu":
        cfg.update(hidden_act="fatrelu", hidden_act_param=act_threshold)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if predictor_rank:
        add_predictors(folder, num_layers, hidden_size, intermediate_size, predictor_rank, seed)
    return folder


def _spread_weights(model) -> None:
    """HF init (std 0.02) makes a 2-layer model nearly uniform; wider weights give
    decisive logits, so greedy parity tests compare real choices, not ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)


def add_predictors(folder: Path, num_layers: int, hidden: int, inter: int, rank: int, seed: int) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(num_layers):
        prefix = f"model.layers.{i}.mlp.predictor"
        tensors[f"{prefix}.fc1.weight"] = torch.randn(rank, hidden, generator=gen) * hidden ** -0.5
        # NOTE: a negative bias-like shift is impossible (no bias), so scale fc2 to get a mix of
        # predicted-on and predicted-off neurons around logit 0.
        tensors[f"{prefix}.fc2.weight"] = torch.randn(inter, rank, generator=gen) * rank ** -0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
