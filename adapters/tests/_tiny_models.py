"""Tiny in-process decoder models shared by the structural adapter tests."""

from __future__ import annotations

import inspect

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

DIMS = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, max_position_embeddings=256)
ARCHS = ("llama", "mistral", "qwen2")


def tiny_config(arch: str, **overrides):
    """A 2-layer config of ``arch`` (GQA 4 -> 2 heads, head_dim 16).

    Mistral slides a 4-token window; Qwen2 keeps its q/k/v biases and slides
    on its second layer, so short prompts already exercise both features.
    """
    defaults = {
        "llama": (LlamaConfig, {"head_dim": 16}),
        "mistral": (MistralConfig, {"head_dim": 16, "sliding_window": 4}),
        "qwen2": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    }
    config_class, extra = defaults[arch]
    return config_class(**{**DIMS, **extra, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every parameter at unit scale so each block visibly changes the logits.

    The default init (std 0.02) makes attention contribute ~1e-3 of the
    residual stream, which would hide wrong surgery behind tiny differences.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if param.dim() >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(1.0 + 0.2 * noise)
    return model


def tiny_model(arch: str, *, seed: int = 0, dtype=torch.float64, attn_implementation: str = "sdpa", **overrides):
    """A randomised tiny causal LM of ``arch`` in ``dtype``, in eval mode."""
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return randomize(model.to(dtype), seed).eval()


def token_batch(seed: int = 0, batch: int = 2, length: int = 9, vocab: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def cache_of(output):
    """The KV cache of a model or generate output (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_kwarg(model) -> str:
    """Name of the forward's cache argument in the installed transformers."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
