"""What the model and the GPU are: configs, checkpoints, the GPU registry, detection."""
