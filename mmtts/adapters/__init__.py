"""Test-time adaptation methods, one module each, registered by name."""

from . import bn, source  # noqa: F401  (registration)
