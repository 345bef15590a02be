"""A bad network in user space: loss, delay with jitter, and blackouts for one process's UDP.

Kernel netem needs root and a network namespace, which CI machines do not give. aiortc's peers
send and receive every datagram through aioice's sockets, which aioice opens with
``loop.create_datagram_endpoint``; ``LinkImpairment.install(loop)`` wraps that call, so every
datagram endpoint opened on that loop afterwards (an ICE host candidate's socket) passes its
outgoing datagrams (``transport.sendto``) and its incoming ones (``protocol.datagram_received``)
through the impairment. TCP (the HTTP signalling) is untouched; so are endpoints opened before.

The impairment (``Impairment``) can be changed at any time (``link.set(...)``): a test plays a
schedule, e.g. clean, then 5 % loss with 50 +- 20 ms jitter, then a 3 s blackout, then the loss
and jitter again. Each direction is impaired on its own, as netem on both ends of a link would:

- loss: each datagram is dropped with probability ``loss``;
- delay: each datagram that is kept is held ``delay_ms`` plus a uniform draw in
  [-``jitter_ms``, +``jitter_ms``] (never below zero), so datagrams may be reordered, as netem's
  jitter reorders them;
- blackout: every datagram is dropped, both ways.

The draws come from one ``random.Random(seed)``: a run's losses depend only on the seed and the
order in which datagrams pass. Memory is bounded: at most ``max_held`` datagrams wait at once
(past it they are dropped and counted as ``overflow``), which at 50 ms of delay is far more than a
session's few hundred datagrams a second.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Callable

MAX_HELD = 10_000  # datagrams held for delay at once, both directions together


@dataclass(frozen=True)
class Impairment:
    """What the link does to each datagram. Times in milliseconds, ``loss`` a fraction in [0, 1]."""

    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    blackout: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss {self.loss}: want a fraction in [0, 1]")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay {self.delay_ms} ms, jitter {self.jitter_ms} ms: want both >= 0")


CLEAN = Impairment()
BLACKOUT = Impairment(blackout=True)


@dataclass
class Counts:
    """Datagrams per direction: passed (delivered, maybe late), lost (the loss draw), blacked out,
    dropped because ``max_held`` were waiting already."""

    passed: int = 0
    lost: int = 0
    blacked_out: int = 0
    overflow: int = 0

    def as_json(self) -> dict:
        return dict(vars(self))


@dataclass
class LinkImpairment:
    """The impairment applied to the datagram endpoints of one event loop (see the module docstring)."""

    seed: int = 0
    max_held: int = MAX_HELD
    impairment: Impairment = CLEAN
    directions: tuple[str, ...] = ("out", "in")  # which ways the impairment applies; the others pass clean
    outgoing: Counts = field(default_factory=Counts)
    incoming: Counts = field(default_factory=Counts)
    held: int = 0  # datagrams waiting for their delay now
    endpoints: int = 0  # endpoints opened through the wrapper
    changes: list[tuple[float, Impairment]] = field(default_factory=list)  # (loop.time(), what was set)

    def __post_init__(self) -> None:
        if not set(self.directions) <= {"out", "in"}:
            raise ValueError(f"directions {self.directions}: want 'out' and/or 'in'")
        self._random = random.Random(self.seed)
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, impairment: Impairment) -> float:
        """Apply ``impairment`` from now on (datagrams already held keep their delay); returns the
        moment, in ``time.monotonic()`` seconds (asyncio's default loop clock)."""
        self.impairment = impairment
        at = self._loop.time() if self._loop is not None else asyncio.get_running_loop().time()
        self.changes.append((at, impairment))
        return at

    def install(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Wrap ``loop.create_datagram_endpoint`` (over any wrapper already there); returns the undo."""
        self._loop = loop
        had_own = "create_datagram_endpoint" in vars(loop)
        original = loop.create_datagram_endpoint

        async def create_datagram_endpoint(protocol_factory, *args, **kwargs):
            transport, protocol = await original(lambda: self._wrap(protocol_factory()), *args, **kwargs)
            return _ImpairedTransport(transport, self), protocol

        loop.create_datagram_endpoint = create_datagram_endpoint

        def uninstall() -> None:
            if had_own:
                loop.create_datagram_endpoint = original
            else:
                del loop.create_datagram_endpoint
        return uninstall

    # -- the datagrams ----------------------------------------------------------------------

    def _wrap(self, protocol: asyncio.DatagramProtocol) -> asyncio.DatagramProtocol:
        """Impair this protocol's traffic in place: its instance's two entry points are replaced, so
        whoever holds the protocol (aioice keeps it as the candidate's) still holds the same object.
        A protocol without an instance dict (``__slots__``) is wrapped in a forwarding one instead."""
        if not hasattr(protocol, "__dict__"):
            protocol = _Forwarding(protocol)
        received = protocol.datagram_received
        made = protocol.connection_made
        protocol.datagram_received = lambda data, addr: self._pass(self.incoming, received, data, addr)
        protocol.connection_made = lambda transport: made(_ImpairedTransport(transport, self))
        self.endpoints += 1
        return protocol

    def _pass(self, counts: Counts, deliver: Callable, data: bytes, addr) -> None:
        """Drop, delay or deliver one datagram going one way."""
        impairment = self.impairment
        if ("out" if counts is self.outgoing else "in") not in self.directions:
            impairment = CLEAN
        if impairment.blackout:
            counts.blacked_out += 1
            return
        if impairment.loss and self._random.random() < impairment.loss:
            counts.lost += 1
            return
        delay = impairment.delay_ms
        if impairment.jitter_ms:
            delay += self._random.uniform(-impairment.jitter_ms, impairment.jitter_ms)
        if delay <= 0:
            counts.passed += 1
            deliver(data, addr)
            return
        if self.held >= self.max_held:
            counts.overflow += 1
            return
        self.held += 1
        counts.passed += 1
        asyncio.get_running_loop().call_later(delay / 1000.0, self._release, deliver, data, addr)

    def _release(self, deliver: Callable, data: bytes, addr) -> None:
        self.held -= 1
        try:
            deliver(data, addr)
        except OSError:
            pass  # the socket closed while the datagram waited: as if it was lost


class _ImpairedTransport:
    """A datagram transport whose ``sendto`` goes through the impairment; everything else is the real one's."""

    def __init__(self, transport: asyncio.DatagramTransport, link: LinkImpairment) -> None:
        self._transport = transport
        self._link = link

    def sendto(self, data: bytes, addr=None) -> None:
        self._link._pass(self._link.outgoing, self._send, data, addr)

    def _send(self, data: bytes, addr) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _Forwarding(asyncio.DatagramProtocol):
    """A protocol that passes every call to another one (whose instance cannot be patched)."""

    def __init__(self, inner: asyncio.DatagramProtocol) -> None:
        self.inner = inner

    def connection_made(self, transport) -> None:
        self.inner.connection_made(transport)

    def datagram_received(self, data: bytes, addr) -> None:
        self.inner.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.inner.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
