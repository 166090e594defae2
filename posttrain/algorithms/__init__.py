"""Pure RL algorithms on tensors: advantage estimators (group-relative, RLOO, GAE), whitening, KL controllers."""
