"""Rollouts for online methods: the `Rollout` record and the generation backends (transformers here, vLLM later)."""
