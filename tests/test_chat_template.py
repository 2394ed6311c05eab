"""Chat templates: the tiny model ships one, prompt ids equal transformers'
apply_chat_template, overrides, clear errors, and conversion keeps the template."""

import json
import os
import shutil

import pytest

from distkv_jax.chat_template import chat_prompt_ids, load_chat_template, validate_messages
from distkv_jax.models.loader import load_tokenizer
from distkv_jax.models.tiny import (CHAT_TEMPLATE_FILE, TINY_CHAT_TEMPLATE, TINY_NAME,
                                    make_tiny_model, tiny_model_dir)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello to the world."},
    {"role": "assistant", "content": "Hello world."},
    {"role": "user", "content": "Once more."},
]

# Any template other than the tiny one; refuses a conversation not opened by a user.
OTHER_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}"
    "{{ raise_exception('the first message must be from the user') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def _hf_ids(tok, messages, template=None):
    out = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_tiny_model_ships_a_template(tiny, tok):
    with open(os.path.join(tiny, CHAT_TEMPLATE_FILE)) as f:
        assert f.read() == TINY_CHAT_TEMPLATE  # saved by save_pretrained, as transformers 5 does
    assert tok.chat_template == TINY_CHAT_TEMPLATE
    text = tok.apply_chat_template(MESSAGES[1:2], add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>\nSay hello to the world.</s>\n<|assistant|>\n"


def test_prompt_ids_equal_apply_chat_template(tok):
    for messages in (MESSAGES, MESSAGES[1:2]):
        ids = chat_prompt_ids(tok, validate_messages(messages))
        assert ids == _hf_ids(tok, messages)
        assert all(type(t) is int for t in ids)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids).endswith("<|assistant|>\n")


def test_override_template(tok, tmp_path):
    path = tmp_path / "other.jinja"
    path.write_text(OTHER_TEMPLATE)
    template = load_chat_template(str(path))
    assert template == OTHER_TEMPLATE
    ids = chat_prompt_ids(tok, MESSAGES[1:], template)
    assert ids == _hf_ids(tok, MESSAGES[1:], OTHER_TEMPLATE) != chat_prompt_ids(tok, MESSAGES[1:])
    # the template's own raise_exception becomes a ValueError with its message
    with pytest.raises(ValueError, match="the first message must be from the user"):
        chat_prompt_ids(tok, MESSAGES, template)
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt_ids(tok, MESSAGES, "{% for m in messages %}")  # syntax error


def test_load_chat_template_errors(tmp_path):
    assert load_chat_template(None) is None
    missing = str(tmp_path / "nope.jinja")
    with pytest.raises(ValueError, match="nope.jinja"):
        load_chat_template(missing)
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_chat_template(str(tmp_path / "empty.jinja"))


def test_no_template_is_a_clear_error(tiny, tmp_path):
    bare = str(tmp_path / "bare")
    shutil.copytree(tiny, bare)
    os.remove(os.path.join(bare, CHAT_TEMPLATE_FILE))
    tok = load_tokenizer(bare)
    assert not tok.chat_template
    with pytest.raises(ValueError, match="no chat template.*--chat_template"):
        chat_prompt_ids(tok, MESSAGES)
    assert chat_prompt_ids(tok, MESSAGES[1:], OTHER_TEMPLATE) == _hf_ids(tok, MESSAGES[1:],
                                                                         OTHER_TEMPLATE)


def test_validate_messages_normalizes():
    out = validate_messages([
        {"role": "developer", "content": "x", "name": "dev", "extra": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "tool", "content": "42", "tool_call_id": "call-1"},
    ])
    assert out == [{"role": "developer", "content": "x", "name": "dev"},
                   {"role": "user", "content": "a\nb"},
                   {"role": "tool", "content": "42", "tool_call_id": "call-1"}]


@pytest.mark.parametrize("messages, match", [
    ("hello", r"^messages: must be a list"),
    ({"role": "user", "content": "hi"}, r"^messages: must be a list"),
    ([], r"^messages: must not be empty"),
    ([{"role": "user", "content": "hi"}, "hi"], r"^messages\[1\]: must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "robot", "content": "c"}], r"^messages\[2\]\.role='robot': must be one of"),
    ([{"content": "hi"}], r"^messages\[0\]\.role=None: must be one of"),
    ([{"role": "user"}], r"^messages\[0\]\.content: missing"),
    ([{"role": "user", "content": None}], r"^messages\[0\]\.content: missing"),
    ([{"role": "user", "content": 7}], r"^messages\[0\]\.content: must be a string or a list"),
    ([{"role": "user", "content": []}], r"^messages\[0\]\.content: must not be an empty list"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "image_url", "image_url": {"url": "x"}}]}],
     r"^messages\[0\]\.content\[1\]\.type='image_url': unsupported"),
    ([{"role": "user", "content": ["a"]}], r"^messages\[0\]\.content\[0\]: must be an object"),
    ([{"role": "assistant", "content": "a", "tool_calls": [{"id": "c"}]}],
     r"^messages\[0\]\.tool_calls: not supported"),
    ([{"role": "user", "content": [{"type": "text"}]}],
     r"^messages\[0\]\.content\[0\]\.text: must be a string"),
    ([{"role": "user", "content": "a", "name": 3}], r"^messages\[0\]\.name: must be a string"),
])
def test_validate_messages_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_cached_tiny_model_without_template_is_upgraded(tiny, tmp_path):
    """A tiny model directory cached before it had a template gets one, and
    nothing else in it changes."""
    old = str(tmp_path / TINY_NAME)
    shutil.copytree(tiny, old)
    os.remove(os.path.join(old, CHAT_TEMPLATE_FILE))
    before = {f: open(os.path.join(old, f), "rb").read() for f in os.listdir(old)}
    assert tiny_model_dir(str(tmp_path)) == old
    after = {f: open(os.path.join(old, f), "rb").read() for f in os.listdir(old)}
    assert after.pop(CHAT_TEMPLATE_FILE).decode() == TINY_CHAT_TEMPLATE
    assert after == before
    assert load_tokenizer(old).chat_template == TINY_CHAT_TEMPLATE


def test_converted_checkpoint_keeps_the_template(tiny, tok, tmp_path):
    """What `python -m distkv_jax.convert` does (load onto the mesh, save_params
    with the source as tokenizer_dir), then the checkpoint's tokenizer."""
    from distkv_jax.mesh import make_mesh
    from distkv_jax.models.checkpoint import is_orbax_checkpoint, save_params
    from distkv_jax.models.loader import load_params

    _, params = load_params(tiny, make_mesh("1x1"))
    with open(os.path.join(tiny, "config.json")) as f:
        hf_config = json.load(f)
    ckpt = str(tmp_path / "ckpt")
    save_params(ckpt, params, hf_config=hf_config, tokenizer_dir=tiny)
    assert is_orbax_checkpoint(ckpt)
    assert os.path.isfile(os.path.join(ckpt, CHAT_TEMPLATE_FILE))
    ctok = load_tokenizer(ckpt)
    assert ctok.chat_template == TINY_CHAT_TEMPLATE
    assert chat_prompt_ids(ctok, MESSAGES) == chat_prompt_ids(tok, MESSAGES)
