"""Tokenizer wrapper: local loading, chat templates in a sandbox, EOS ids from all sources."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.engine.text.tokenizer import ChatTemplateError, Tokenizer, load_eos_token_ids

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = ["Hello there, how are you today?", "I am fine, thank you!",
          "The weather is nice 🌞 and 天气很好.", "user assistant system roles"]


def _write_tokenizer_folder(folder: Path, chat_template: str | None = CHAT_TEMPLATE,
                            add_bos: bool = False) -> Path:
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    if add_bos:
        from tokenizers import processors
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    raw.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(str(_write_tokenizer_folder(tmp_path_factory.mktemp("tok"))))


def test_basic_properties_and_round_trip(tok):
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.vocab_size == len(tok.hf) >= len(SPECIALS)
    text = "Hello there 🌞 天气"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_token_id] + ids) == text
    assert tok.decode([tok.eos_token_id] + ids, skip_special_tokens=False) == "</s>" + text


def test_token_text_keeps_leading_space(tok):
    ids = tok.encode(" there", add_special_tokens=False)
    assert "".join(tok.token_text(i) for i in ids) == " there"
    assert tok.token_text(tok.eos_token_id) == "</s>"


def test_missing_folder_and_missing_files_name_the_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="empty-model"):
        Tokenizer.from_pretrained(str(empty))


def test_chat_template_renders(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "  Hi!  "}]
    assert tok.has_chat_template
    assert tok.apply_chat_template(messages) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("Hi!</s>\n")


def test_raise_exception_helper_becomes_chat_template_error(tok):
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_encode_chat_has_single_bos(tmp_path):
    with_bos = Tokenizer.from_pretrained(str(_write_tokenizer_folder(tmp_path / "a",
                                                                     add_bos=True)))
    assert with_bos.encode("Hello")[0] == with_bos.bos_token_id    # tokenizer adds BOS
    ids = with_bos.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == with_bos.bos_token_id and ids[1] != with_bos.bos_token_id
    assert ids.count(with_bos.bos_token_id) == 1
    # A template that does not write BOS still gets exactly one from the tokenizer's habit.
    no_bos_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    folder = _write_tokenizer_folder(tmp_path / "b", chat_template=no_bos_template,
                                     add_bos=True)
    ids = Tokenizer.from_pretrained(str(folder)).encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 0 and ids.count(0) == 1
    # A tokenizer that adds no BOS gets none added.
    plain = Tokenizer.from_pretrained(str(_write_tokenizer_folder(tmp_path / "c",
                                                                  chat_template=no_bos_template)))
    assert 0 not in plain.encode_chat([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'evil'}) %}{{ messages }}",
])
def test_sandbox_blocks_dunder_access_and_mutation(tmp_path, template):
    folder = _write_tokenizer_folder(tmp_path / "evil", chat_template=template)
    tok = Tokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "hi"}]
    # The sandbox either refuses (SecurityError/UndefinedError -> ChatTemplateError) or
    # renders the unsafe attribute as undefined, i.e. nothing; it never leaks internals.
    try:
        rendered = tok.apply_chat_template(messages)
    except ChatTemplateError:
        rendered = ""
    assert rendered.strip() in ("", str(messages)), rendered[:200]
    assert messages == [{"role": "user", "content": "hi"}]


def test_missing_template_raises_clear_error(tmp_path):
    tok = Tokenizer.from_pretrained(str(_write_tokenizer_folder(tmp_path / "t",
                                                                chat_template=None)))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_override_template_file(tmp_path):
    folder = _write_tokenizer_folder(tmp_path / "t", chat_template=None)
    jinja_file = tmp_path / "override.jinja"
    jinja_file.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = Tokenizer.from_pretrained(str(folder), chat_template_path=str(jinja_file))
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == \
        "[user] hey\n[assistant] "
    json_file = tmp_path / "chat_template.json"
    json_file.write_text(json.dumps({"chat_template": "{{ messages | tojson }}"}))
    tok = Tokenizer.from_pretrained(str(folder), chat_template_path=str(json_file))
    assert tok.apply_chat_template([{"role": "user", "content": "<é>"}]) == \
        '[{"role": "user", "content": "<é>"}]'
    with pytest.raises(ChatTemplateError, match="not found"):
        Tokenizer.from_pretrained(str(folder), chat_template_path=str(tmp_path / "nope.jinja"))


def test_eos_ids_merged_from_all_sources(tmp_path, tok):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert load_eos_token_ids(str(model_dir), tok) == {1, 5, 7, 9}
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 3]}))
    assert load_eos_token_ids(str(model_dir), tok) == {1, 3, 4}
    assert load_eos_token_ids(str(tmp_path / "no-configs"), tok) == {1}
