"""Bridges to other libraries; each module imports its library lazily, so ``qkv`` never needs them.

- :mod:`qkv.integrations.transformers_attention`: ``attn_implementation="qkv"`` for Hugging Face
  ``transformers`` models.
"""
