"""pytest-benchmark suites: lrmath against what people use today (see docs/benchmarks.md)."""
