"""Fixtures of the hostile-input tests: the service tests' worker environment."""

from __future__ import annotations

from tests.service.conftest import base_env

__all__ = ["base_env"]
