"""A uvicorn HTTP protocol that survives slow clients (used by ``medrag serve``).

uvicorn has a keep-alive timeout but no deadline for reading a request, so 20,000 connections that
send nothing (or a header byte now and then) held every file descriptor and ``/health/live``
stopped answering. :class:`GuardedH11Protocol` adds what nginx calls
``client_header_timeout``/``client_body_timeout`` (one deadline per request, from its first byte
or from the connection's start, until the body is complete) and a connection cap that, when full,
evicts the oldest connection still waiting for its request instead of refusing the new one. A
reverse proxy in front (``deploy/nginx/medrag.conf``) is the recommended deployment; these limits
hold without one. Its own module so that only ``medrag serve`` pays for importing uvicorn.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-read deadline and an evicting connection cap.

    Class attributes are set by ``medrag serve`` before the server starts (one server per process).
    """

    request_timeout_s: float = 10.0  # headers + body of one request must arrive within this
    max_connections: int = 4096  # open connections; above it the oldest unfinished request is dropped
    _waiting: OrderedDict[int, GuardedH11Protocol] = OrderedDict()  # connections mid-request, oldest first
    dropped = 0  # connections closed by the deadline or the cap (for tests and logs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()
        while len(self.connections) > self.max_connections and self._waiting:
            _, oldest = self._waiting.popitem(last=False)
            oldest._drop()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body:
            self._disarm()  # the whole request is in: the app's own time is not limited here
        elif self._deadline is None:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # idle from here on is uvicorn's keep-alive timeout
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        # jittered (x1 to x1.5): connections opened in one burst are not all dropped, and then all
        # reopened, in the same instant (a reconnect burst overflows the kernel's SYN queue)
        self._deadline = self.loop.call_later(self.request_timeout_s * (1 + 0.5 * random.random()), self._drop)
        self._waiting[id(self)] = self

    def _disarm(self) -> None:
        timer = getattr(self, "_deadline", None)
        if timer is not None:
            timer.cancel()
            self._deadline = None
        self._waiting.pop(id(self), None)

    def _drop(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            type(self).dropped += 1
            self.transport.close()
