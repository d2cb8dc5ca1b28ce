"""Benchmarks: figures reported, never pass/fail (timing stays out of the test suite)."""
