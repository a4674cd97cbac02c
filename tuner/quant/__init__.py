"""Building quantized checkpoints (AWQ/GPTQ) and judging their quality."""
