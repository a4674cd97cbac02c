"""Request sets and the streaming client that sends them on an arrival schedule."""
