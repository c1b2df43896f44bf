"""Shared pytest configuration.

Since trio 0.25 errors leaving a nursery arrive wrapped in an ExceptionGroup; unwrap
one-item groups so failures show plain tracebacks and `pytest.raises` matches.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, Any, None]:
    outcome = yield
    exc = outcome.excinfo[1] if outcome.excinfo else None
    if exc is not None and isinstance(exc, BaseExceptionGroup):
        inner = _unwrap(exc)
        if inner is not exc:
            outcome.force_exception(inner)
