"""Test-time adaptation methods, one module each, registered by name."""

from . import alpha_bn, bn, deyo, eata, gui_rcpo, sar, source, tent  # noqa: F401  (registration)
