"""Start, watch and stop vLLM; settings to argv; failure classes."""
