"""Tiny randomly initialized transformers models (PyTorch), saved with
`save_pretrained`, used as the independent reference for the Flax models."""

from __future__ import annotations

import os

import numpy as np

# name -> (config class name, config kwargs). All tiny: 2 layers, hidden 64.
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama_gqa": ("LlamaConfig", dict(BASE)),
    "llama_mha_bias_tied": ("LlamaConfig", dict(BASE, num_key_value_heads=4, attention_bias=True,
                                                mlp_bias=True, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(BASE, num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "llama_linear_rope": ("LlamaConfig", dict(BASE, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": ("MistralConfig", dict(BASE, sliding_window=None)),
    # head_dim 64: the native kernel's bfloat16 pair-product prefill path
    "llama_hd64": ("LlamaConfig", dict(BASE, hidden_size=128, head_dim=64)),
    "qwen2_bias_tied": ("Qwen2Config", dict(BASE, tie_word_embeddings=True, rope_theta=1000000.0)),
}


def make_hf_model(name: str, path: str, seed: int = 0):
    """Build, perturb and save one tiny model; returns the torch model (eval, float32)."""
    import torch
    import transformers

    cls_name, kwargs = FAMILIES[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # transformers initializes norms to 1 and biases to 0; perturb everything so
    # that every parameter (and its loading) matters to the output.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    model.generation_config.eos_token_id = None  # parity tests run a fixed number of tokens
    model.generation_config.pad_token_id = 0
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor([prompt], dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def hf_greedy_logprobs(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation and, at each generated position, the
    log-softmax (float64) of the token it chose."""
    import torch

    toks = hf_greedy(model, prompt, max_new_tokens)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + toks])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    return toks, [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
