"""Tests of ``qkv.ops``: parity with SDPA, an independent reference, properties, errors, dispatch."""
