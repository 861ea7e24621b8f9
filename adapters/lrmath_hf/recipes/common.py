"""Pieces shared by the recipes: plans from specs, parameter accounting, factorised installs."""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

import lrmath
from lrmath.nystrom import RidgeTooSmallError

from ..calibrate import CalibrationPlan, calibrate
from ..modules import FactorizedLinear, count_parameters
from ..specs import ArchSpec, get_linear, iter_layers, set_linear

__all__ = [
    "group_name",
    "host_view",
    "input_plan",
    "linear_parameters",
    "weight64",
    "install_factors",
    "run_calibration",
    "timer",
    "gram_psd_rtol",
]


def group_name(group: Iterable[str]) -> str:
    """Statistic name of an input group, e.g. ``("q", "k", "v") -> "q+k+v"``."""
    return "+".join(group)


def input_plan(spec: ArchSpec, roles: Iterable[str] | None = None, **extra: Any) -> CalibrationPlan:
    """One input statistic per group of linears that share an input (restricted to ``roles``)."""
    wanted = set(spec.roles if roles is None else roles)
    inputs = {
        group_name(group): spec.linears[group[0]]
        for group in spec.input_groups
        if wanted.intersection(group)
    }
    return CalibrationPlan(inputs=inputs, **extra)


def union_plan(spec: ArchSpec) -> CalibrationPlan:
    """Every statistic the decoder recipes read: one calibration serves every recipe and ratio.

    All input groups, the q / k / v head outputs (pre-RoPE) and the angular importance; pass
    the result of :func:`run_calibration` with it as ``stats=`` to any recipe that takes one.
    """
    heads = {role: (spec.linears[role], spec.num_heads if role == "q" else spec.num_kv_heads, spec.head_dim)
             for role in ("v", "q", "k") if role in spec.linears}
    return input_plan(spec, head_outputs=heads, importance=True)


def linear_parameters(model: nn.Module, spec: ArchSpec) -> int:
    """Parameters of every layer's compressible linears (factorised ones count both factors)."""
    return sum(
        count_parameters(get_linear(model, index, role, spec))
        for index, _ in iter_layers(model, spec)
        for role in spec.roles
    )


def gram_psd_rtol(dim: int, gram_dtype: torch.dtype = torch.float32) -> float:
    """Relative eigenvalue level below zero that a calibrated Gram may show from rounding.

    The calibration accumulates each batch's Gram product in ``gram_dtype`` (float32 by
    default), so the float64 statistic is PSD only to that precision.
    """
    return 10.0 * dim * float(torch.finfo(gram_dtype).eps)


MAX_RIDGE = 0.1  # relative: a tenth of the mean channel variance; beyond it the refit is mostly shrinkage


def with_ridge_escalation(fn, ridge: float, what: str):
    """``(fn(used), used)``: ``fn`` retried with ten times the relative ridge (up to :data:`MAX_RIDGE`)
    while lrmath reports it below the rounding of the statistic
    (:class:`lrmath.nystrom.RidgeTooSmallError`).

    That happens only with degenerate calibration (fewer or collinear tokens than channels, so
    the float32-accumulated Gram is singular and rounds below ``-lam``); a ``RuntimeWarning``
    names the ridge actually used. Callers that factor the same statistic again pass ``used``
    on, so one layer is escalated (and warned about) once.
    """
    used = ridge
    while True:
        try:
            out = fn(used)
            break
        except RidgeTooSmallError:
            if used >= MAX_RIDGE:
                raise
            used = min(MAX_RIDGE, max(10.0 * used, 1e-8))
    if used != ridge:
        warnings.warn(f"{what}: relative ridge raised from {ridge:g} to {used:g}; the calibration statistic is "
                      "singular below the requested ridge (too few or collinear calibration tokens)",
                      RuntimeWarning, stacklevel=3)
    return out, used


def host_view(a):
    """A CPU tensor as a numpy array on the same memory (no copy); anything else as it is.

    The decisions' linear algebra then runs through numpy / SciPy, whose host
    paths are the faster ones here: BLAS ``trmm`` for ``W L``, and less per-call
    overhead in the small operations around each factorisation (the ``svd``
    recipe's decisions on SmolLM2-135M: 37.6 s against 39.4 s with the same
    arrays as torch tensors, one thread). GPU tensors stay on their device.
    """
    if isinstance(a, torch.Tensor) and a.device.type == "cpu" and not a.requires_grad:
        return a.numpy()
    return a


def weight64(linear: nn.Module) -> torch.Tensor:
    """A dense linear's weight as a float64 tensor on its device (the decisions run in float64)."""
    return linear.weight.detach().to(torch.float64)


def install_factors(model: nn.Module, spec: ArchSpec, layer: int, role: str, left, right,
                    *, block_identity: bool = False) -> nn.Module:
    """Replace a dense linear by ``left @ right`` (optionally stored with a block identity).

    The original bias is kept; the factors are cast to the linear's dtype and device.
    """
    dense = get_linear(model, layer, role, spec)
    dtype, device = dense.weight.dtype, dense.weight.device
    columns = None
    if block_identity:
        left, right, columns = lrmath.block_identity(left, right)
        columns = [int(c) for c in np.asarray(lrmath._backend.to_numpy(columns))]
    module = FactorizedLinear.from_factors(
        left, right, None if dense.bias is None else dense.bias.detach(),
        columns=columns, dtype=dtype, device=device,
    )
    set_linear(model, layer, role, module, spec)
    return module


def run_calibration(model, spec: ArchSpec, batches, plan: CalibrationPlan, *, progress: bool,
                    sequential: bool = False, on_layer=None):
    """Calibrate ``model`` layer by layer (see :func:`lrmath_hf.calibrate.calibrate`)."""
    layers = [layer for _, layer in iter_layers(model, spec)]
    return calibrate(model, layers, batches, plan, sequential=sequential, on_layer=on_layer, progress=progress)


@contextmanager
def timer(timings: dict, key: str):
    """Add the wall time of the block to ``timings[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
