"""Data: format detection, tokenisation, loading and the built-in arithmetic data sets."""
