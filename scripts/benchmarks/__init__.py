"""The modes of scripts/benchmark.py: ``models``, ``scan`` and ``loader``."""
