"""The event loop every holdfast process runs on: uvloop when installed.

Measured with the benchmark's bare grpc.aio echo server on a 2-core machine:
about 20 % more calls/s and 10 % less server CPU per call than asyncio's own
loop. That is true of any grpc.aio server, so `holdfast bench` runs its echo
baseline and its clients on this same loop: the ratio to echo compares
holdfast with the best a bare server does here, not with a slower loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def name() -> str:
    """`uvloop` or `asyncio`: what `run` will use, for reports."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
