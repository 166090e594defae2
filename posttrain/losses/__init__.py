"""Pure loss functions: tensors and floats in, (unreduced loss, detached metrics) out. No configs, no models."""
