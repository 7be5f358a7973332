"""Shared check of the loader test files: a bad model fails with a one-line ModelLoadError."""

from __future__ import annotations

import pytest

from roofline import LLM
from roofline.errors import ModelLoadError


def expect_load_error(model: str, *fragments: str) -> str:
    """Loading `model` end to end raises a one-line ModelLoadError mentioning every fragment."""
    with pytest.raises(ModelLoadError) as info:
        LLM(model=model, dtype="float32", device="cpu", kv_cache_memory=16 << 20, show_progress=True)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message
