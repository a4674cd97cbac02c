"""Which candidates to try, and why the others are dropped: space, pruning, variants."""
