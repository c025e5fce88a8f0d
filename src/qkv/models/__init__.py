"""Assembled models and decoding."""
