"""uvicorn's h11 connection with a deadline for each request head.

uvicorn closes a connection idle between requests (timeout_keep_alive), and h11 bounds a head's
size (h11_max_incomplete_event_size), but nothing bounds the time a client takes to send a head:
a silent connection, or one that trickles a header byte now and then (slowloris), is held for
ever. Here a connection whose request head is not complete `head_timeout` seconds after it opened,
or after the first byte of a later request on it, is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def head_timeout_protocol(head_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config's `http`) closing slow request heads."""

    class HeadTimeoutProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.head_deadline = self.loop.call_later(head_timeout, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE  # a head is still to come (or to complete)
            if waiting and self.head_deadline is None and data:
                self.head_deadline = self.loop.call_later(head_timeout, self._head_too_slow)
            elif not waiting:
                self._stop_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_deadline()
            super().connection_lost(exc)

        def _stop_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_too_slow(self) -> None:
            self.head_deadline = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return HeadTimeoutProtocol
