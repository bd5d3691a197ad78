"""The public API of holdfast: everything a team imports to build its own
deterministic service. Nothing outside this module's `__all__` is promised;
the names are pinned by tests/test_framework.py.
"""

from __future__ import annotations

from service.machine import Machine

__all__ = ["Machine"]
