"""cupy._core for tests/fakegpu."""
