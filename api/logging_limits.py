"""Rate-limited logging: an attack must not turn into millions of log lines.

A slow-loris or request flood made the server write ~2 million lines a minute (821 MB): one
access line per request and one "Invalid HTTP request" warning per broken connection.
:class:`RateLimitFilter` lets at most ``per_second`` records per message key (logger name +
unformatted message, so "GET /health/live -> 200" lines share one key whatever their timings)
through each second; the first record let through after a suppressed stretch carries
``(suppressed K similar messages)``, so nothing is hidden without a count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable


class RateLimitFilter(logging.Filter):
    """Pass at most ``per_second`` records per (logger, message template) per one-second window."""

    def __init__(self, per_second: int = 20, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        super().__init__()
        if per_second < 1:
            raise ValueError("per_second must be >= 1")
        self.per_second = per_second
        self._clock = clock
        self._max_keys = max_keys  # bounded memory, whatever messages an attacker provokes
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                if len(self._windows) >= self._max_keys:
                    self._windows.clear()
                w = self._windows[key] = [now, 0, 0]
            if now - w[0] >= 1.0:
                w[0], w[1] = now, 0
            if w[1] >= self.per_second:
                w[2] += 1
                return False
            w[1] += 1
            suppressed, w[2] = int(w[2]), 0
        if suppressed:
            record.msg = f"{record.msg} (suppressed {suppressed} similar messages)"
        return True


def install(loggers: Iterable[str] = ("medrag.api", "uvicorn.error", "uvicorn.access", "uvicorn", "asyncio"),
            per_second: int = 20) -> RateLimitFilter:
    """Attach one shared filter to the named loggers and to their handlers (a filter on a logger
    does not see records propagated from its children; one on the handler does)."""
    flt = RateLimitFilter(per_second)
    for name in loggers:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in lg.filters):
            lg.addFilter(flt)
        for h in lg.handlers:
            if not any(isinstance(f, RateLimitFilter) for f in h.filters):
                h.addFilter(flt)
    return flt
