"""Quality and speed of a (compressed) model: perplexity, tokens/s, ViT feature fidelity, linear probe.

Every function takes the model as it is (dense, compressed or reloaded) and changes
nothing in it; all run under ``torch.inference_mode``. The ViT measures live in
:mod:`lrmath_hf.vision_eval` and the paired tests in :mod:`lrmath_hf.significance`; both
are re-exported here.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import check_vocabulary
from .latency import _sync  # CUDA work is asynchronous: wait for it before reading the clock
# the paired tests and the ViT measures live in their own modules; they are part of this one's API
from .significance import PairedScoreTest, PairedTest, paired_accuracy_test, paired_score_test
from .vision_eval import (FeatureFidelity, feature_fidelity, fit_linear_probe, linear_probe_accuracy,
                          linear_probe_correct, prediction_agreement, vit_features)

__all__ = [
    "perplexity",
    "ThroughputResult",
    "throughput",
    "throughput_interleaved",
    "FeatureFidelity",
    "feature_fidelity",
    "prediction_agreement",
    "vit_features",
    "fit_linear_probe",
    "linear_probe_accuracy",
    "linear_probe_correct",
    "PairedTest",
    "paired_accuracy_test",
    "PairedScoreTest",
    "paired_score_test",
]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, windows, *, batch_size: int = 1, progress: bool = True) -> float:
    """Perplexity of a causal LM over token windows.

    Parameters
    ----------
    model : transformers causal LM
        Returns ``.logits`` of shape ``(batch, seq, vocab)``.
    windows : torch.Tensor or list of torch.Tensor
        Integer token ids, shape ``(n, seq_len)`` (see :func:`lrmath_hf.data.token_windows`),
        or a list of such batches (or of 1-D windows) of one ``seq_len``.
    batch_size : int, optional
        Windows per forward pass.
    progress : bool, optional
        Show a tqdm bar.

    Returns
    -------
    float
        ``exp(mean NLL)`` over the ``n * (seq_len - 1)`` predicted tokens.

    Raises
    ------
    ValueError
        No windows, windows shorter than 2 tokens or of different lengths, token ids
        outside the model's vocabulary, ``batch_size < 1``.
    TypeError
        Windows that are not integer token ids.

    Notes
    -----
    Each window is scored on its own (no context from the previous one), the log-softmax
    runs in float32 and the NLL sum accumulates in float64.
    """
    from tqdm.auto import tqdm

    if isinstance(windows, (list, tuple)) and windows and all(isinstance(w, torch.Tensor) for w in windows):
        if len({w.shape[-1] for w in windows}) != 1:
            raise ValueError(f"windows of different lengths {sorted({w.shape[-1] for w in windows})}: "
                             "perplexity averages over windows of one seq_len")
        windows = torch.cat([w.reshape(-1, w.shape[-1]) for w in windows])  # a list of batches
    windows = torch.as_tensor(windows)
    if windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise TypeError(f"windows must be integer token ids, got {windows.dtype}")
    windows = windows.long()
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (n >= 1, seq_len >= 2), got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_vocabulary(windows, model, "the windows tensor")
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll.double())
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@dataclass(frozen=True)
class ThroughputResult:
    """Median tokens/s of prefill and greedy decode, with the range over repeats."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_range: tuple[float, float]
    decode_range: tuple[float, float]
    prefill_tokens: int
    decode_tokens: int
    repeats: int
    device: str


def _prompt_ids(tokenizer_or_ids, prefill_tokens: int) -> torch.Tensor:
    """A (1, prefill_tokens) prompt: given ids, else wiki evaluation text, else seeded ids."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.reshape(1, -1)
        if ids.shape[1] < prefill_tokens:
            raise ValueError(f"{ids.shape[1]} token ids given, prefill_tokens={prefill_tokens}")
        return ids[:, :prefill_tokens].long()
    from .data import token_windows

    try:
        from .zoo import load_text

        text = load_text("wiki", split="evaluation")
    except ModuleNotFoundError:
        # Timing does not depend on the content: any real vocabulary ids will do.
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, len(tokenizer_or_ids), (1, prefill_tokens), generator=generator)
    return token_windows(tokenizer_or_ids, text, prefill_tokens, 1)


def _pad_id(model):
    """The pad id to pass to ``generate``: the config's, else its (first) EOS id, else None.

    A fixed pad id silences ``generate()``'s warning when the config has none.
    """
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    return pad


class _Speed:
    """Times one causal LM's prefill and greedy decode from a fixed prompt, one round at a time."""

    def __init__(self, model, ids: torch.Tensor, decode_tokens: int):
        self.model, self.device, self.decode_tokens = model, _device(model), decode_tokens
        self.ids = ids.to(self.device)
        self.mask = torch.ones_like(self.ids)
        self.pad = _pad_id(model)
        self.prefill_s: list[float] = []
        self.decode_s: list[float] = []

    def _timed(self, fn) -> float:
        _sync(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - start

    def _generate(self, n: int):
        return self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=self.pad)

    def round(self, record: bool) -> None:
        t_prefill = self._timed(lambda: self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True))
        t_one = self._timed(lambda: self._generate(1))
        t_all = self._timed(lambda: self._generate(self.decode_tokens))
        if record:  # an unrecorded round warms up kernels and allocators
            self.prefill_s.append(t_prefill)
            self.decode_s.append(max(t_all - t_one, 1e-9))

    def result(self) -> ThroughputResult:
        prefill_tokens = int(self.ids.shape[1])
        prefill_rates = [prefill_tokens / t for t in self.prefill_s]
        decode_rates = [(self.decode_tokens - 1) / t for t in self.decode_s]
        return ThroughputResult(
            prefill_tokens_per_s=statistics.median(prefill_rates),
            decode_tokens_per_s=statistics.median(decode_rates),
            prefill_range=(min(prefill_rates), max(prefill_rates)),
            decode_range=(min(decode_rates), max(decode_rates)),
            prefill_tokens=prefill_tokens,
            decode_tokens=self.decode_tokens,
            repeats=len(self.prefill_s),
            device=str(self.device),
        )


def _check_speed_args(prefill_tokens: int, decode_tokens: int, repeats: int) -> None:
    if decode_tokens < 2 or prefill_tokens < 1 or repeats < 1:
        raise ValueError("need decode_tokens >= 2, prefill_tokens >= 1, repeats >= 1")


@torch.inference_mode()
def throughput(model, tokenizer_or_ids, *, prefill_tokens: int = 512, decode_tokens: int = 64,
               repeats: int = 3) -> ThroughputResult:
    """Prefill and greedy-decode speed of a causal LM with its KV cache, batch 1.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer_or_ids : tokenizer or torch.Tensor
        Prompt token ids, or a tokenizer to cut them from the wiki evaluation text.
    prefill_tokens : int, optional
        Prompt length.
    decode_tokens : int, optional
        Generated tokens (EOS does not stop generation early).
    repeats : int, optional
        Timed runs after one untimed warm-up; the median is reported.

    Returns
    -------
    ThroughputResult

    Notes
    -----
    Prefill: one forward pass over the prompt that fills the cache.  Decode: the time of
    ``generate(max_new_tokens=decode_tokens)`` minus that of ``generate(max_new_tokens=1)``,
    both greedy from the same prompt, so both include the same prefill and set-up costs and
    the difference is ``decode_tokens - 1`` cached single-token steps.  To compare two
    models, use :func:`throughput_interleaved`.
    """
    _check_speed_args(prefill_tokens, decode_tokens, repeats)
    speed = _Speed(model, _prompt_ids(tokenizer_or_ids, prefill_tokens), decode_tokens)
    for run in range(repeats + 1):
        speed.round(record=run > 0)
    return speed.result()


@torch.inference_mode()
def throughput_interleaved(models: dict, tokenizer_or_ids, *, prefill_tokens: int = 512, decode_tokens: int = 64,
                           repeats: int = 3) -> dict[str, ThroughputResult]:
    """:func:`throughput` of several models measured round by round in alternating order.

    Parameters
    ----------
    models : dict of str to causal LM
        E.g. ``{"dense": dense, "compressed": compressed}``; every model gets the same prompt.
    tokenizer_or_ids, prefill_tokens, decode_tokens, repeats
        As in :func:`throughput`.

    Returns
    -------
    dict of str to ThroughputResult

    Notes
    -----
    Timing one model after the other lets a change in the machine's load between the two
    runs pass for a speedup (two idle runs of the end-to-end benchmark on the 2-core CI
    machine gave ratios 0.3x apart).  Here every round times each model once, and the
    order is reversed every other round (A B, B A, ...), so a slow drift costs each model
    alike; ratios of the medians are then comparable.  One warm-up round first.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of name -> model")
    _check_speed_args(prefill_tokens, decode_tokens, repeats)
    ids = _prompt_ids(tokenizer_or_ids, prefill_tokens)
    speeds = {name: _Speed(model, ids, decode_tokens) for name, model in models.items()}
    order = list(speeds)
    for run in range(repeats + 1):
        for name in (order if run % 2 == 0 else order[::-1]):
            speeds[name].round(record=run > 0)
    return {name: speed.result() for name, speed in speeds.items()}
