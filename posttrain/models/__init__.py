"""Models: loading, log-probabilities and the built-in tiny models."""
