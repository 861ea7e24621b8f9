"""Hypothesis profiles, as SciPy does: a deterministic one for CI and a broad one for local runs.

Choose with ``LRMATH_HYPOTHESIS_PROFILE=ci|broad`` (default ``ci``).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "broad",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("LRMATH_HYPOTHESIS_PROFILE", "ci"))

try:  # the proofs use small arrays: one thread avoids 10-50x slowdowns from thread handoffs on busy cores
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass

try:  # the same for the BLAS under numpy / scipy
    from threadpoolctl import threadpool_limits

    import scipy.linalg  # noqa: F401  (loads scipy's BLAS so the limit reaches it)

    threadpool_limits(1)
except ImportError:
    pass
