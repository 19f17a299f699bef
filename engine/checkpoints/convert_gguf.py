"""Convert a Llama-architecture GGUF file into an HF-style model folder.

The folder holds config.json, model.safetensors (HF tensor names, dequantized), a byte-level
BPE tokenizer.json built from the GGUF vocabulary + merges, tokenizer_config.json (with the
chat template from the GGUF metadata), special_tokens_map.json, generation_config.json and
gguf_conversion.json (where it came from). transformers' `from_pretrained` and our own loader
read it like any downloaded checkpoint.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")      # library
    sparse-serve convert SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2      # CLI (main_convert)

NOTE: the folder is written into a temporary sibling directory and renamed into place at the
end, so a killed conversion never leaves a folder that looks complete.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparse_serve.engine.checkpoints.loader import TORCH_DTYPES

logger = logging.getLogger(__name__)

# Bump when the folder layout or the numbers written change, so caches keyed on it reconvert.
CONVERTER_VERSION = 1
_PROVENANCE_FILE = "gguf_conversion.json"

# GGUF tensor name -> HF name; "{i}" is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFConversionError(ValueError):
    """The GGUF file is not something this converter can turn into a Llama folder."""


def read_gguf_metadata(reader) -> dict[str, Any]:
    """Every key-value field of an open `gguf.GGUFReader` as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def llama_hparams(meta: dict[str, Any]) -> dict[str, Any]:
    """Model dimensions from llama.cpp's `{arch}.*` keys, checked for what we support."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"only Llama-architecture GGUF files are supported, got {arch!r}")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFConversionError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise GGUFConversionError(f"partial rotary embeddings ({rotary_dim} of {head_dim}) are not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise GGUFConversionError(f"rope scaling {scaling!r} is not supported")
    return {
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "rope_parameters": rope,
    }


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    NOTE: llama.cpp's HF->GGUF converter reorders each head's rows from HF's rotate-half layout
    (first half of the head dim pairs with the second half) to interleaved pairs (row 2j pairs
    with 2j+1): rows go [h, 2, d/2] -> [h, d/2, 2]. Reading that view back as [h, d/2, 2] and
    swapping the last two axes restores HF's order.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def convert_tensors(reader, hparams: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantize every tensor, rename it to HF's name and undo the q/k permutation."""
    from gguf import quants

    num_layers = hparams["num_hidden_layers"]
    tensors: dict[str, torch.Tensor] = {}
    for info in reader.tensors:
        hf_name = _hf_tensor_name(info.name, num_layers)
        # NOTE: GGUF lists dims fastest-first; numpy/torch want [out_features, in_features].
        shape = tuple(int(d) for d in reversed(info.shape.tolist()))
        weight = quants.dequantize(info.data, info.tensor_type).reshape(shape)  # float32
        if hf_name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, hparams["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, hparams["num_key_value_heads"])
        # NOTE: np.array copies: F32 tensors are read-only views into the memory-mapped file.
        tensors[hf_name] = torch.from_numpy(np.array(weight, dtype=np.float32)).to(dtype)
    missing = [n for n in _expected_names(num_layers) if n not in tensors]
    if missing:
        raise GGUFConversionError(f"GGUF file lacks tensors for {missing[:4]} ({len(missing)} missing)")
    return tensors


def _hf_tensor_name(name: str, num_layers: int) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        layer = int(parts[1])
        if layer < num_layers:
            return f"model.layers.{layer}.{_LAYER_NAMES[parts[2]]}"
    # NOTE: unknown tensors (biases, rope_freqs, MoE experts) mean a model we would load wrongly.
    raise GGUFConversionError(f"unsupported GGUF tensor {name!r}")


def _expected_names(num_layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(num_layers):
        names += [f"model.layers.{i}.{hf}" for hf in _LAYER_NAMES.values()]
    return names


def hf_config(hparams: dict[str, Any], meta: dict[str, Any], tensors: dict[str, torch.Tensor],
              dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM."""
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[0])
    tied = "lm_head.weight" not in tensors
    eos_ids = _eos_token_ids(meta)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        **hparams,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": dtype,
        # NOTE: transformers < 5 reads rope_theta/rope_scaling; 5.x reads rope_parameters.
        "rope_theta": hparams["rope_parameters"]["rope_theta"],
    }
    if hparams["rope_parameters"]["rope_type"] != "default":
        config["rope_scaling"] = dict(hparams["rope_parameters"])
    return config


def _eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """EOS first, then end-of-turn / end-of-message ids when the file names other ones."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = meta.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise GGUFConversionError("GGUF metadata names no tokenizer.ggml.eos_token_id")
    return ids


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    eos_ids = _eos_token_ids(meta)
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    return {k: v for k, v in config.items() if v is not None}


# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) whose split rule is GPT-2's regex with
# every digit split off first (HF: Digits(individual) + ByteLevel), and those that are plain GPT-2.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE = {"gpt2", "gpt-2", "default"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                  "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def build_tokenizer(meta: dict[str, Any]):
    """A `tokenizers.Tokenizer` equal to the byte-level BPE the GGUF metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFConversionError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {kind!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError("GGUF vocabulary has duplicate tokens")
    # NOTE: byte-level tokens never contain a real space (it is spelled "Ġ"), so each merge
    # "a b" splits into exactly two pieces.
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        tokenizer.pre_tokenizer = byte_level
    else:
        # NOTE: a wrong split rule tokenizes silently differently from llama.cpp; refuse instead.
        raise GGUFConversionError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_ in zip(tokens, token_types) if kind_ == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_ in zip(tokens, token_types) if kind_ == _USER_DEFINED])
    steps = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = _special_token(meta, "bos_token_id"), _special_token(meta, "eos_token_id")
    prefix = [bos] if meta.get("tokenizer.ggml.add_bos_token") and bos is not None else []
    suffix = [eos] if meta.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if prefix or suffix:
        steps.append(processors.TemplateProcessing(
            single=" ".join(prefix + ["$A"] + suffix),
            pair=" ".join(prefix + ["$A"] + suffix + prefix + ["$B:1"] + suffix),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(prefix + suffix)]))
    tokenizer.post_processor = processors.Sequence(steps)
    return tokenizer


def _special_token(meta: dict[str, Any], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return None if index is None else meta["tokenizer.ggml.tokens"][int(index)]


def write_tokenizer_files(meta: dict[str, Any], folder: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (chat template) and special_tokens_map.json."""
    build_tokenizer(meta).save(str(folder / "tokenizer.json"))
    roles = {role: _special_token(meta, key) for role, key in _SPECIAL_ROLES.items()}
    roles = {role: token for role, token in roles.items() if token is not None}
    extra = [t for t, kind in zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or [])
             if kind == _CONTROL and t not in roles.values()]
    config = {
        # NOTE: the generic fast class loads tokenizer.json as written; a model-specific class
        # (GPT2Tokenizer) may rebuild the pre-tokenizer from its own defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if extra:
        config["additional_special_tokens"] = extra
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    else:
        logger.warning("GGUF file has no tokenizer.chat_template; the folder has no chat template")
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json",
                {**roles, **({"additional_special_tokens": extra} if extra else {})})


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32", *, overwrite: bool = False) -> str:
    """Convert `gguf_path` into an HF folder at `out_dir` and return its path.

    Raises FileExistsError when `out_dir` exists (unless `overwrite`), GGUFConversionError for
    files that are not Llama-architecture with a byte-level BPE tokenizer.
    """
    import gguf
    from safetensors.torch import save_file

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    src, out = Path(gguf_path), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    started = time.perf_counter()
    logger.info("converting %s -> %s (%s)", src, out, dtype)
    reader = gguf.GGUFReader(str(src))
    meta = read_gguf_metadata(reader)
    hparams = llama_hparams(meta)
    tensors = convert_tensors(reader, hparams, TORCH_DTYPES[dtype])
    config = hf_config(hparams, meta, tensors, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(meta))
        write_tokenizer_files(meta, tmp, model_max_length=hparams["max_position_embeddings"])
        stat = src.stat()
        _write_json(tmp / _PROVENANCE_FILE, {
            "source": str(src.resolve()), "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "converter_version": CONVERTER_VERSION,
            "dtype": dtype, "name": meta.get("general.name")})
        # NOTE: mkdtemp and safetensors create owner-only entries; a cache folder should be
        # readable like any other checkpoint.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    num_params = sum(t.numel() for t in tensors.values())
    logger.info("converted %s: %d layers, %.1fM params, %s in %.1f s", src.name,
                hparams["num_hidden_layers"], num_params / 1e6, dtype, time.perf_counter() - started)
    return str(out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to `out`; an existing `out` is swapped out first."""
    if overwrite and out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "folder")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        # NOTE: rename(2) refuses a non-empty target, so a racing converter that finished first
        # keeps its folder and we report FileExistsError instead of mixing the two.
        os.rename(tmp, out)
    except OSError as exc:
        if out.exists():
            raise FileExistsError(f"{out} appeared while converting") from exc
        raise


def main_convert(argv: list[str]) -> int:
    """`sparse-serve convert GGUF_FILE OUT_DIR [--dtype D] [--force]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparse-serve convert",
        description="Convert a Llama-architecture GGUF file into an HF-style model folder.")
    parser.add_argument("gguf_file", metavar="GGUF_FILE", help="path to the .gguf file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32",
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(args.gguf_file):
        logger.error("no such file: %s", args.gguf_file)
        return 2
    try:
        path = convert_gguf(args.gguf_file, args.out_dir, args.dtype, overwrite=args.force)
    except (GGUFConversionError, FileExistsError, ValueError) as exc:
        logger.error("conversion failed: %s", exc)
        return 1
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main_convert(sys.argv[1:]))
