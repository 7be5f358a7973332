"""Fixtures of tests/offload: the live-server helper of tests/server, for the /metrics test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def start_server():
    """tests/server/conftest.py's `serve` (conftest files are not importable by name)."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "server", "conftest.py")
    spec = importlib.util.spec_from_file_location("server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.serve
