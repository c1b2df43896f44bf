"""The supervision boundary: no peer and no message can end the daemon.

Every piece of work done for one peer or one message (a dial, a connection, a decoded
message, a timer tick fed by peers' data) runs inside `Supervisor.guard`. An exception
there is *contained*: the guard counts it by place and exception type, logs one line per
kind at most every `log_every` seconds (the traceback only at DEBUG, since it may show
peer-controlled values), and returns, so the caller drops that message or closes that
connection and the node goes on. Cancellation and KeyboardInterrupt pass through
untouched: only `Exception` is contained.

Fatal *local* conditions (`p2pfl.fatal.FatalError`: cannot bind, disk full, an unusable
data dir) pass through too, even when peer-driven work meets them (a message completes
a round, the checkpoint write finds the disk full): they end the daemon with an exit
code (see docs/cli.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from p2pfl.fatal import FatalError, exception_leaves
from p2pfl.logs import event


class Supervisor:
    """Contains and accounts for failures of per-peer and per-message work."""

    def __init__(
        self, log: logging.Logger, clock: Callable[[], float], *, log_every: float = 10.0
    ) -> None:
        self.log = log
        self.clock = clock
        self.log_every = log_every
        self.contained: Counter[str] = Counter()  # "where:ExceptionType" -> count
        self._last_logged: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.contained.values())

    @contextmanager
    def guard(self, where: str, peer: str | None = None) -> Iterator[None]:
        """Run the block; contain any `Exception` (also inside an exception group).

        After a contained failure the `with` statement simply ends; callers that need
        to know (to close a connection, say) compare `total` before and after, or use
        `failed()` directly.
        """
        try:
            yield
        except BaseException as exc:
            contained: BaseException | None
            rest: BaseException | None
            if isinstance(exc, BaseExceptionGroup):
                contained, rest = exc.split(_containable)
            elif _containable(exc):
                contained, rest = exc, None
            else:
                raise  # cancellation, KeyboardInterrupt, a fatal local condition
            for leaf in [] if contained is None else exception_leaves(contained):
                self.failed(where, leaf, peer)
            if rest is not None:
                raise rest from None

    def failed(self, where: str, exc: BaseException, peer: str | None = None) -> None:
        kind = f"{where}:{type(exc).__name__}"
        self.contained[kind] += 1
        now = self.clock()
        last = self._last_logged.get(kind)
        if last is not None and now - last < self.log_every:
            self.log.debug("contained %s again (%d in all)", kind, self.contained[kind])
            return
        self._last_logged[kind] = now
        who = f" from peer {peer[:12]}" if peer else ""
        self.log.warning(
            "contained an error in %s%s: %s: %s (%d so far; the node keeps running)",
            where,
            who,
            type(exc).__name__,
            _short(exc),
            self.contained[kind],
            extra=event(
                "error.contained",
                where=where,
                peer=peer,
                error=type(exc).__name__,
                detail=_short(exc),
                count=self.contained[kind],
            ),
        )
        self.log.debug("traceback of the contained error", exc_info=exc)


def _containable(exc: BaseException) -> bool:
    """A leaf error caused by a peer or a message: any Exception but a FatalError."""
    return (
        isinstance(exc, Exception)
        and not isinstance(exc, BaseExceptionGroup)
        and not isinstance(exc, FatalError)
    )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
