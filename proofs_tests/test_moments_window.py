"""Contract of ``Moments``' device path: batches summed about one anchor equal the exact pairwise path.

Statement: on a GPU, ``Moments.update`` adds each batch's power sums about the first batch's mean
and folds them back by the exact inverse shift when the statistics are read
(``lrmath._moments_window``). For any stream, including streams whose mean jumps by many times
its spread between batches, the statistics equal the two-pass float64 values within the same
``tolerance(float64, n, kappa = 1 + mean/spread)`` as the pairwise path; a batch whose mean is
further from the anchor than its own spread is merged exactly instead (so the subtraction never
cancels more than one bit); NaN, Inf and overflow are refused as on the host. On the CPU the
device path is forced by treating host arrays as device arrays.
"""

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lrmath
from lrmath import moments as _moments_module
from proofs_tests.backends import BACKENDS, to_backend
from proofs_tests.test_moments import check_against_reference, split_samples

CPU = ("numpy", "torch-cpu")


def device_path(backend):
    """Force the device path for host backends (a GPU backend takes it anyway)."""
    if backend in ("numpy", "torch"):
        return mock.patch.object(_moments_module, "_on_host", lambda x, xp: False)
    return contextlib.nullcontext()


@st.composite
def jumping_streams(draw):
    """``split_samples`` whose batches are moved apart by 0 to 1000 times the data's spread."""
    X, shift, parts, order = draw(split_samples())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = float(np.std(X)) + 1e-300
    jumps = [0.0, 0.1, 3.0, 1000.0]
    moved = [part + draw(st.sampled_from(jumps)) * spread * rng.standard_normal(X.shape[1]) for part in parts]
    total = np.concatenate([moved[i] for i in order])
    # kappa: the reference's tolerance measures the mean against the spread of the whole (moved) stream
    kappa_shift = float(np.abs(total.mean(axis=0)).max() / (np.std(total, axis=0).min() + 1e-300)) if len(total) else 0
    return moved, order, min(max(shift, kappa_shift), 1e3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_feature", [False, True])
@given(case=jumping_streams())
def test_device_path_equals_two_pass_for_any_stream(backend, per_feature, case):
    parts, order, shift = case
    p = parts[0].shape[1]
    with device_path(backend):
        acc = lrmath.Moments(p, per_feature=per_feature)
        for i in order:
            acc.update(to_backend(parts[i], backend))
    X = np.concatenate([parts[i] for i in order])
    if per_feature:
        check_against_reference(acc, X, shift)
    else:
        exact = lrmath.Moments(p).update(X)
        got, want = acc.to_dict(), exact.to_dict()
        assert got["count"] == want["count"]
        full = lrmath.Moments(p, per_feature=True)
        with device_path(backend):
            for i in order:
                full.update(to_backend(parts[i], backend))
        check_against_reference(full, X, shift)
        for key in ("mean", "m2", "m3", "m4"):  # the per-feature sums change nothing else
            np.testing.assert_array_equal(got[key], full.to_dict()[key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [2, 4])
def test_stationary_batches_share_one_window_and_a_jump_is_merged_exactly(backend, order):
    rng = np.random.default_rng(7)
    X = 1000.0 + rng.standard_normal((8 * 64, 5))
    with device_path(backend):
        acc = lrmath.Moments(5, order=order)
        for part in np.split(X, 8):
            acc.update(to_backend(part, backend))
        assert acc._window is not None and acc._window.count == X.shape[0]  # no merge was needed
        jump = 50.0 + rng.standard_normal((64, 5))  # 50 spreads away from the anchor
        acc.update(to_backend(jump, backend))
        assert acc._window is None  # merged by the exact path; the next batch starts a new window
    Y = np.concatenate([X, jump])
    np.testing.assert_allclose(lrmath._backend.to_numpy(acc.covariance()), np.cov(Y.T, bias=True),
                               rtol=0, atol=1e-12 * np.abs(np.cov(Y.T)).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_path_refuses_nan_inf_and_overflow(backend):
    good = np.random.default_rng(0).standard_normal((16, 3))
    with device_path(backend):
        for bad, match in ((np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (1e100, "not finite")):
            for order in (2, 4):
                acc = lrmath.Moments(3, order=order).update(to_backend(good, backend))
                x = good.copy()
                x[3, 1] = bad
                if bad == 1e100 and order == 2:
                    x[4, 1] = -1e200  # squares overflow only at 1e155 and beyond
                with pytest.raises(ValueError, match=match):
                    acc.update(to_backend(x, backend))
                assert acc.count == 16  # the refused batch left nothing behind


def test_device_path_takes_tensors_that_require_grad_and_inference_tensors():
    import torch

    rng = np.random.default_rng(3)
    parts = [torch.from_numpy(rng.standard_normal((32, 4))) for _ in range(4)]
    with device_path("torch"):
        acc = lrmath.Moments(4)
        acc.update(parts[0].clone().requires_grad_(True))
        with torch.inference_mode():  # windows made of inference tensors...
            acc2 = lrmath.Moments(4).update(parts[0])
            acc3 = lrmath.Moments(4).update(parts[0]).update(parts[1])
        acc2.update(parts[1])  # ...still grow and fold outside inference mode
        acc.update(parts[1])
    want = np.cov(torch.cat(parts[:2]).numpy().T, bias=True)
    for a in (acc, acc2, acc3):
        got = a.covariance()
        assert not got.requires_grad
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-13)
