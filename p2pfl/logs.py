"""The node's logs on stderr: readable text lines, or one JSON object per line.

Both formats stamp records with an ISO-8601 time to the millisecond with its UTC
offset (``2026-12-04T17:20:01.123+00:00``): a date and an offset are what lets lines
from several machines be merged and sorted, and milliseconds what orders the events
of one round. The JSON format (``--log-format json``, docs/operations.md "Logs") is
for log shippers: every line carries the same keys (``ts``, ``level``, ``logger``,
``event``, ``msg``) plus the fields of its event, under event names that do not change
when a message is reworded. Call sites name an event with ``extra=event(...)``; a
record without one gets ``<logger>.message``, so no JSON line lacks an event.

Secrets: fields whose names say they hold one are masked, and values registered with
`redact` (the federation secret, when the node reads it) are masked wherever they
appear in a line, in both formats: a secret that slipped into a message or a
traceback must still not reach a log file.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import IO, Any

LOG_FORMATS = ("text", "json")
"""Values of `--log-format` / `log_format`."""

REDACTED = "[redacted]"
RESERVED_KEYS = ("ts", "level", "logger", "event", "msg", "exc", "node")
"""Keys every JSON line may carry; an event field of the same name is renamed
``field_<name>`` instead of overwriting them."""

_SECRET_WORDS = ("secret", "password", "passphrase", "token", "private")
_MIN_REDACTED_LEN = 4  # a shorter "secret" would mask ordinary words in every line
_secrets: set[str] = set()


def event(name: str, **fields: Any) -> dict[str, Any]:
    """The `extra=` of a log call that names its event: ``log.info("peer %s
    connected", p, extra=event("peer.connected", peer=p))``. Field names are the
    JSON keys; keep them stable (docs/operations.md lists them)."""
    return {"event": name, "fields": fields}


def redact(secret: bytes | str) -> None:
    """Mask this value (and its hex form) wherever it appears in a log line from now on."""
    if isinstance(secret, bytes):
        forms = {secret.decode("utf-8", "replace"), secret.hex()}
    else:
        forms = {secret, secret.encode().hex()}
    _secrets.update(f for f in forms if len(f) >= _MIN_REDACTED_LEN)


def iso_time(created: float) -> str:
    """Local time of a record, ISO-8601 with milliseconds and the UTC offset."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def event_name(record: logging.LogRecord) -> str:
    """The record's event: the one its call named, else ``<logger>.message`` with the
    package prefix dropped (``p2pfl.transport`` -> ``transport.message``)."""
    named = getattr(record, "event", None)
    if isinstance(named, str) and named:
        return named
    return f"{record.name.removeprefix('p2pfl.')}.message"


def _scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _secret_field(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _plain(value: Any) -> Any:
    """A JSON-ready value: numbers, strings, bools, None, lists and string-keyed maps;
    anything else as its str(); non-finite floats as strings (JSON has no NaN)."""
    if isinstance(value, str):
        return _scrub(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _secret_field(str(k)) else _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return _scrub(str(value))


NODE_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "p2pfl_node_name", default=None
)
"""Which node of an in-process scenario a record comes from: many nodes share one log
there. Set once in each node's task; the node's tasks and worker threads inherit it."""


class TextFormatter(logging.Formatter):
    """``<ISO time> <LEVEL> <logger>: <message>``, one record per line (a traceback
    follows on its own lines, as usual)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)

    def format(self, record: logging.LogRecord) -> str:
        node = NODE_NAME.get()
        if node is not None:  # "... p2pfl.node [n3]: ...", without touching the record
            record = logging.makeLogRecord({**record.__dict__, "name": f"{record.name} [{node}]"})
        return _scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event_name(record),
            "msg": _scrub(record.getMessage()),
        }
        node = NODE_NAME.get()
        if node is not None:
            line["node"] = node
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = f"field_{key}" if key in RESERVED_KEYS else str(key)
                line[name] = REDACTED if _secret_field(name) else _plain(value)
        if record.exc_info:
            line["exc"] = _scrub(self.formatException(record.exc_info))
        # Strings were scrubbed before encoding, where JSON escapes cannot hide a secret.
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for a `log_format` value (validated by NodeConfig)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}: {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


def setup_logging(
    level: str = "info", log_format: str = "text", stream: IO[str] | None = None
) -> None:
    """Send the package's records at `level` and above to stderr (or `stream`)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger("p2pfl")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
