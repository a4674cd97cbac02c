"""vtune: a tuner for vLLM serving.

Estimate what fits and where the roofline knee is, prune vLLM's settings with those bounds,
measure the survivors on the real engine and write the best serving profile.
"""

__version__ = "0.1.0"
