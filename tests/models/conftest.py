"""Every model test runs on one thread (``one_thread`` in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _models_on_one_thread(one_thread: None) -> None:
    """Applies ``one_thread`` to every test in this directory."""
