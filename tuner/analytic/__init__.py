"""The pure analytic model: weights, KV, pool, capacity, roofline, explanation. No I/O."""
