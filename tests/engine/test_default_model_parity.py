"""The embedded default model (SmolLM2-135M-Instruct from GGUF): our greedy chat output equals
transformers' on the same converted folder, sparsity off, 64 tokens for each of 5 prompts."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a neural network is.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]
NUM_TOKENS = 64


@pytest.fixture(scope="module")
def default_model():
    from sparse_serve.engine.checkpoints.default_model import DefaultModelMissingError, default_model_path
    try:
        return default_model_path()
    except DefaultModelMissingError as exc:   # `make test` installs it; say loudly if not
        pytest.skip(f"embedded model package missing: {exc}")


def test_greedy_chat_matches_transformers(default_model):
    from transformers import AutoModelForCausalLM, GenerationConfig

    llm = LLM(default_model)
    tokenizer = llm.engine.tokenizer
    chats = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = llm.generate(chats, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True))

    reference = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    # NOTE: no EOS on either side (ignore_eos / eos_token_id=None): 64 tokens are compared even
    # where the chat answer ends early, which makes the comparison longer, not looser.
    # (replacing the model's generation_config: a config passed to generate() is merged with it
    # and would bring the EOS id back)
    reference.generation_config = GenerationConfig(do_sample=False, max_new_tokens=NUM_TOKENS, eos_token_id=None,
                                                   pad_token_id=tokenizer.eos_token_id)
    for ids, result in zip(chats, ours):
        with torch.no_grad():
            # NOTE: an explicit mask: otherwise transformers infers one from pad_token_id, which is
            # <|im_end|> here, and masks the chat template's own end-of-turn tokens.
            prompt = torch.tensor([ids])
            expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt))[0, len(ids):].tolist()
        assert len(expected) == NUM_TOKENS
        assert result.completions[0].token_ids == expected, tokenizer.decode(expected)
    assert "Paris" in ours[0].completions[0].text
