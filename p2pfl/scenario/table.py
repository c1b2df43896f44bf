"""Typed, path-aware reads from a TOML table, and the error that names the key at fault.

The scenario schema reads every table through this, so every mistake in a scenario
file comes back as one `ScenarioError` whose `path` is the dotted key ("data.alpha"),
and a key nobody read (a typo) is refused instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ScenarioError(ValueError):
    """A scenario file is wrong; `path` is the dotted key at fault ("" for the whole file)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def __reduce__(self) -> tuple[type[ScenarioError], tuple[str, str]]:
        # Picklable, so a failing worker process reports it instead of hanging a pool.
        return (type(self), (self.path, self.message))


class Table:
    """Typed, path-aware reads from one TOML table; `finish` rejects keys nobody read."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ScenarioError(path, f"expected a table, got {data!r}")
        self._data = data
        self._path = path
        self._known: list[str] = []

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def _mark(self, key: str) -> None:
        if key not in self._known:
            self._known.append(key)

    def present(self) -> list[str]:
        """Every key present (marks them known: the caller handles them all)."""
        for key in self._data:
            self._mark(key)
        return list(self._data)

    def has(self, key: str) -> bool:
        self._mark(key)
        return key in self._data

    def raw(self, key: str) -> Any:
        self._mark(key)
        return self._data.get(key)

    def table(self, key: str) -> Table:
        value = self.raw(key)
        return Table({} if value is None else value, self._key(key))

    def get_int(self, key: str, default: int | None, *, minimum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise ScenarioError(self._key(key), "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(self._key(key), f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ScenarioError(self._key(key), f"must be >= {minimum}")
        return value

    def get_float(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(self._key(key), f"expected a number, got {value!r}")
        if positive and not value > 0:
            raise ScenarioError(self._key(key), "must be > 0")
        return float(value)

    def get_str(self, key: str, default: str, *, choices: Sequence[str] | None = None) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ScenarioError(self._key(key), f"expected a string, got {value!r}")
        if choices is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ScenarioError(self._key(key), f"unknown value {value!r}; choose one of {options}")
        return value

    def finish(self) -> None:
        unknown = [k for k in self._data if k not in self._known]
        if unknown:
            where = self._key(unknown[0])
            known = ", ".join(self._known)
            raise ScenarioError(where, f"unknown key; known keys here: {known}")
