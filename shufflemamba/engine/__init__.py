"""Training and evaluation engine: distributed setup, the loop, resumable state, tracking."""
