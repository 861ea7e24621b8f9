"""Test tiers: tests marked ``slow`` run only with ``LRMATH_TEST_TIER=full``."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LRMATH_TEST_TIER", "default") == "full":
        return
    skip = pytest.mark.skip(reason="broader tier: set LRMATH_TEST_TIER=full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
