"""Leaf modules that replace dense linears: factorised and head-wise projections.

Each module keeps the ``in_features`` / ``out_features`` of the linear it
replaces, so the surrounding transformers code (which only calls it) is
unchanged.  Each exposes :meth:`manifest_entry` (what :mod:`lrmath_hf.io` writes)
and is rebuilt from that entry by :func:`module_from_entry`, with parameters
on any device (``"meta"`` for a skeleton that allocates nothing).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "FactorizedLinear",
    "HeadwiseProjection",
    "replace_linear",
    "count_parameters",
    "manifest_entry",
    "module_from_entry",
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_tensor(array: Any, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    # numpy arrays, torch tensors or anything with __array__ / __dlpack__.
    tensor = array if isinstance(array, torch.Tensor) else torch.as_tensor(array)
    return tensor.to(dtype=dtype or tensor.dtype, device=device or tensor.device).contiguous()


def _complement(columns: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[columns] = False
    return torch.arange(size, dtype=torch.long)[keep]


class FactorizedLinear(nn.Module):
    """``y = (x R^T) L^T + b`` with ``L`` (out, r) and ``R`` (r, in).

    Parameters
    ----------
    in_features, out_features, rank : int
        Shapes of the factors.
    bias : bool
        Whether a bias of length ``out_features`` is kept.
    columns : sequence of int, optional
        Block-identity storage: ``R[:, columns] = I_r`` exactly, so only
        ``R_rest = R[:, rest]`` (``rest`` = the other input columns, ascending)
        is stored and ``x R^T = x[..., columns] + x[..., rest] R_rest^T``.
    device, dtype
        Where and how the parameters are created (``device="meta"`` allocates nothing).

    Notes
    -----
    Storage is ``r (m + n)`` plain and ``r (m + n - r)`` with block identity,
    always below ``m n`` for ``r < min(m, n)`` in the latter form.  The
    block-identity form arises from a junction ``J = V_1`` in LatentLLM
    (Koike-Akino et al., 2025); choosing ``columns`` is the job of
    ``lrmath.block_identity``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = False,
        columns: Sequence[int] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, min({in_features}, {out_features})]")
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        factory = {"device": device, "dtype": dtype}
        self.left = nn.Parameter(torch.empty(out_features, rank, **factory))
        if columns is None:
            self.right = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.columns = self.rest = None
        else:
            cols = torch.as_tensor(list(columns), dtype=torch.long)
            if cols.numel() != rank or cols.unique().numel() != rank or cols.min() < 0 or cols.max() >= in_features:
                raise ValueError(f"columns must be {rank} distinct indices in [0, {in_features})")
            # Index buffers are derived from the manifest, so they stay out of the state dict.
            index_device = None if str(device) == "meta" else device
            self.register_buffer("columns", cols.to(index_device), persistent=False)
            self.register_buffer("rest", _complement(cols, in_features).to(index_device), persistent=False)
            self.right_rest = nn.Parameter(torch.empty(rank, in_features - rank, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)

    @classmethod
    def from_factors(
        cls,
        left: Any,
        right: Any,
        bias: Any = None,
        *,
        columns: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> "FactorizedLinear":
        """Build from ``left`` (out, r), ``right`` (r, in) and an optional bias.

        With ``columns``, ``right[:, columns]`` must be the identity (checked to
        a dtype-scaled tolerance) and only the remaining columns are stored.
        Arrays may be numpy or torch; ``dtype`` / ``device`` default to ``left``'s.
        """
        left_t = _as_tensor(left, dtype, device)
        dtype, device = left_t.dtype, left_t.device
        right_t = _as_tensor(right, dtype, device)
        out_features, rank = left_t.shape
        rank_r, in_features = right_t.shape
        if rank_r != rank:
            raise ValueError(f"left {tuple(left_t.shape)} and right {tuple(right_t.shape)} disagree on the rank")
        module = cls(in_features, out_features, rank, bias=bias is not None, columns=columns,
                     device=device, dtype=dtype)
        with torch.no_grad():
            module.left.copy_(left_t)
            if columns is None:
                module.right.copy_(right_t)
            else:
                block = right_t[:, module.columns]
                eye = torch.eye(rank, dtype=dtype, device=device)
                tol = 100 * rank * torch.finfo(dtype).eps
                if not torch.allclose(block, eye, rtol=0.0, atol=tol):
                    raise ValueError("right[:, columns] is not the identity; block-identity storage would change y")
                module.right_rest.copy_(right_t[:, module.rest])
            if bias is not None:
                module.bias.copy_(_as_tensor(bias, dtype, device).reshape(out_features))
        return module

    @property
    def block_identity(self) -> bool:
        """Whether ``R`` is stored as ``[I | R_rest]`` up to a column permutation."""
        return self.columns is not None

    def right_matrix(self) -> torch.Tensor:
        """The full ``R`` (r, in), rebuilt from the block-identity form if needed."""
        if not self.block_identity:
            return self.right
        full = self.right_rest.new_zeros(self.rank, self.in_features)
        full[:, self.columns] = torch.eye(self.rank, dtype=full.dtype, device=full.device)
        full[:, self.rest] = self.right_rest
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_identity:
            inner = x.index_select(-1, self.columns) + nn.functional.linear(x.index_select(-1, self.rest), self.right_rest)
        else:
            inner = nn.functional.linear(x, self.right)
        return nn.functional.linear(inner, self.left, self.bias)

    def extra_repr(self) -> str:
        form = ", block_identity=True" if self.block_identity else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{form}")

    def manifest_entry(self) -> dict[str, Any]:
        """JSON-ready description: kind, shapes, rank, bias, dtype, block-identity columns."""
        return {
            "kind": "factorized",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dtype": _dtype_name(self.left.dtype),
            "columns": None if self.columns is None else [int(c) for c in self.columns.tolist()],
        }


class HeadwiseProjection(nn.Module):
    """Per-head low-rank projection ``q_h = E_h (A_h x) + b_h`` for FLAT's Q/K PCA.

    Parameters
    ----------
    in_features : int
        Model width ``n``.
    num_heads, head_dim, rank : int
        ``H`` heads of dimension ``d_h``, each reduced to ``r`` components.
    bias : bool
        Whether a bias of length ``H d_h`` is kept (Qwen2 q/k biases).
    device, dtype
        Where and how the parameters are created.

    Notes
    -----
    ``right`` stacks the ``A_h`` (r, n) into (H r, n); ``expansion`` holds
    ``E_h`` (d_h, r) as (H, d_h, r).  The output has the layout of the dense
    projection, (..., H d_h), so RoPE still rotates an exact ``d_h`` vector and
    the key cache is unchanged.  FLAT-LLM (Tian et al., 2025) takes
    ``E_h = Q_h`` and ``A_h = Q_h^T W_h`` from the PCA of head ``h``'s
    pre-RoPE outputs.  Parameters: ``H r (n + d_h)`` (+ ``H d_h`` bias).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        rank: int,
        *,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 0 < rank <= head_dim:
            raise ValueError(f"rank {rank} outside [1, head_dim={head_dim}]")
        self.in_features, self.num_heads, self.head_dim, self.rank = map(int, (in_features, num_heads, head_dim, rank))
        self.out_features = self.num_heads * self.head_dim
        factory = {"device": device, "dtype": dtype}
        self.right = nn.Parameter(torch.empty(num_heads * rank, in_features, **factory))
        self.expansion = nn.Parameter(torch.empty(num_heads, head_dim, rank, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None)

    @classmethod
    def from_factors(
        cls,
        expansion: Any,
        right: Any,
        bias: Any = None,
        *,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> "HeadwiseProjection":
        """Build from ``expansion`` (H, d_h, r), ``right`` (H, r, n) or (H r, n) and a bias (H d_h)."""
        expansion_t = _as_tensor(expansion, dtype, device)
        dtype, device = expansion_t.dtype, expansion_t.device
        num_heads, head_dim, rank = expansion_t.shape
        right_t = _as_tensor(right, dtype, device).reshape(num_heads * rank, -1)
        module = cls(right_t.shape[1], num_heads, head_dim, rank, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            module.expansion.copy_(expansion_t)
            module.right.copy_(right_t)
            if bias is not None:
                module.bias.copy_(_as_tensor(bias, dtype, device).reshape(-1))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = nn.functional.linear(x, self.right)
        lead = latent.shape[:-1]
        # one product batched over heads, (h, tokens, r) @ (h, r, d_h): one CPU thread, 9 heads of
        # r = 32: 22 us against einsum's 37 us for one decode token, 362 against 383 us for 512;
        # greedy decode of a flat (qk=True) SmolLM2 1.048x faster (scripts/headwise_forward_ab.py)
        per_head = latent.reshape(-1, self.num_heads, self.rank).transpose(0, 1)
        heads = torch.bmm(per_head, self.expansion.mT).transpose(0, 1).reshape(*lead, self.num_heads * self.head_dim)
        return heads if self.bias is None else heads + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"rank={self.rank}, bias={self.bias is not None}")

    def manifest_entry(self) -> dict[str, Any]:
        """JSON-ready description: kind, shapes, rank, bias, dtype."""
        return {
            "kind": "headwise",
            "in_features": self.in_features,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dtype": _dtype_name(self.right.dtype),
        }


def manifest_entry(module: nn.Module) -> dict[str, Any]:
    """Manifest entry of any supported leaf: the modules above or a plain ``nn.Linear``."""
    if hasattr(module, "manifest_entry"):
        return module.manifest_entry()
    if type(module) is nn.Linear:
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": _dtype_name(module.weight.dtype),
        }
    raise TypeError(f"no manifest entry for {type(module).__name__}")


def module_from_entry(entry: dict[str, Any], *, device: Any = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Build an uninitialised module from a :func:`manifest_entry` dict.

    ``dtype`` overrides the recorded dtype; ``device="meta"`` allocates no storage.
    """
    dtype = dtype or getattr(torch, entry["dtype"])
    kind = entry["kind"]
    if kind == "linear":
        return nn.Linear(entry["in_features"], entry["out_features"], bias=entry["bias"], device=device, dtype=dtype)
    if kind == "factorized":
        return FactorizedLinear(entry["in_features"], entry["out_features"], entry["rank"], bias=entry["bias"],
                                columns=entry.get("columns"), device=device, dtype=dtype)
    if kind == "headwise":
        return HeadwiseProjection(entry["in_features"], entry["num_heads"], entry["head_dim"], entry["rank"],
                                  bias=entry["bias"], device=device, dtype=dtype)
    raise ValueError(f"unknown module kind {kind!r}; known: linear, factorized, headwise")


def replace_linear(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Set ``new_module`` at ``qualified_name`` (``"model.layers.0.mlp.up_proj"``); return the old one."""
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if not isinstance(old, nn.Module):
        raise TypeError(f"{qualified_name} is a {type(old).__name__}, not a module")
    setattr(parent, attr, new_module)
    return old


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter entries (tied parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
