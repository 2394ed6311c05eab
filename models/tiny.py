"""A built-in tiny Llama model directory, made locally (no download, no torch).

`make_tiny_model(path)` writes what a Hugging Face model directory holds:
config.json, model.safetensors with random weights (fixed seed), a byte-level
BPE tokenizer trained on a small built-in corpus, and a chat template
(chat_template.jinja, ChatML-like markers written as plain text). The weights
are random, so the text it generates is noise; what matters is that every real
loading path (config, safetensors, tokenizer, chat template) is exercised.
"""

from __future__ import annotations

import json
import os

import numpy as np

TINY_NAME = "tiny-llama"

_CORPUS = """\
The KV cache of a long request can be larger than the memory of one instance.
DistAttention splits attention into micro attentions over blocks of keys and values.
Each device computes a partial output and its log sum exp, and the partials are merged exactly.
An instance that runs out of memory borrows blocks from an instance that has memory to spare.
The global manager keeps a ledger of debts between instances and picks a creditor.
Queries are small and travel between devices; keys and values stay where they are.
Once upon a time a small model learned to say hello to the world.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9.
"""

TINY_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="float32",
)


# `<s><|user|>\nhi</s>\n<|assistant|>\n`: the markers are plain text (the tiny
# vocabulary has no tokens for them); each turn ends with the eos token, so a
# generated reply stops at `</s>`.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a template


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    return tok


def make_tiny_model(path: str, seed: int = 0, init_std: float = 0.1, **overrides) -> str:
    """Write a tiny random Llama model directory at `path` (idempotent for the
    same arguments: deterministic weights and tokenizer). Returns `path`."""
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    cfg = dict(TINY_CONFIG, **overrides)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    H, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    V, D = cfg["vocab_size"], cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D

    def w(*shape):
        return (rng.standard_normal(shape) * init_std).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": np.ones(H, np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(q_dim, H),
            p + "self_attn.k_proj.weight": w(kv_dim, H),
            p + "self_attn.v_proj.weight": w(kv_dim, H),
            p + "self_attn.o_proj.weight": w(H, q_dim),
            p + "mlp.gate_proj.weight": w(inter, H),
            p + "mlp.up_proj.weight": w(inter, H),
            p + "mlp.down_proj.weight": w(H, inter),
            p + "input_layernorm.weight": np.ones(H, np.float32),
            p + "post_attention_layernorm.weight": np.ones(H, np.float32),
        })
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(V, H)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(min(V, 512)),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(path)
    if not os.path.exists(os.path.join(path, CHAT_TEMPLATE_FILE)):
        _write_chat_template(path)  # transformers 4 put it in tokenizer_config.json
    return path


def _write_chat_template(path: str) -> None:
    """Add the chat template file to a tiny model directory, atomically: the
    processes of a multi-process job may all do it at once."""
    tmp = os.path.join(path, f"{CHAT_TEMPLATE_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(TINY_CHAT_TEMPLATE)
    os.replace(tmp, os.path.join(path, CHAT_TEMPLATE_FILE))


def cache_root() -> str:
    """The project's cache directory ($DISTKV_CACHE, else ~/.cache/distkv_jax):
    the tiny model and the native kernel's build live there."""
    return os.environ.get("DISTKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "distkv_jax")


def tiny_model_dir(cache_dir: str | None = None) -> str:
    """The built-in tiny model's directory, created on first use (and given the
    chat template if it was made before the tiny model had one)."""
    cache_dir = cache_dir or cache_root()
    path = os.path.join(cache_dir, TINY_NAME)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        # Build beside it and rename: the processes of a multi-process job may
        # all get here at once, and none may read a half-written directory.
        import shutil

        tmp = f"{path}.tmp-{os.getpid()}"
        make_tiny_model(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                raise
    elif not os.path.exists(os.path.join(path, CHAT_TEMPLATE_FILE)):
        # Made by an older version: weights and tokenizer are deterministic,
        # so only the template is missing.
        _write_chat_template(path)
    return path
