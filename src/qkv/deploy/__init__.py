"""Deploying trained qkv models: CTranslate2 export and engine, and a translation service.

Submodules are imported by their users (``qkv.deploy.ctranslate2_export``, ``qkv.deploy.server``, ...),
so that importing ``qkv.deploy`` never pulls in an optional dependency.
"""
