"""The HTTP listener, bounded against slow and numerous clients.

aiohttp keeps a connection that has not finished sending its request headers for its keep-alive
timeout (75 s by default in ``web.run_app``), and accepts connections without limit: a client that
opens a few thousand sockets and trickles a byte a second into each (slowloris) holds file
descriptors and memory for free. Here:

- ``header_timeout``: a connection that has not sent a whole request this long after it opened
  (or after its last response) is closed. aiohttp's keep-alive timer does exactly that: it starts
  when a connection opens, is not extended by partial data, and only closes a connection that is
  waiting for a request, never one whose request or response is under way.
- ``max_connections``: past it, a new connection gets ``503`` and is closed at once, before any
  parsing. WebSockets and uploads count while they last.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: 49\r\n\r\n{\"error\": \"too many open connections: try later\"}")


class _Refusal(asyncio.Protocol):
    """What a connection past the cap talks to: one 503, then the door."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY)
        transport.close()


class BoundedSite(web.TCPSite):
    """A TCP site that refuses connections past ``max_connections`` (see the module's docstring)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            return _Refusal()
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner (TCPSite.start's first step)
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, self._host, self._port, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port, backlog=self._backlog)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def start_listening(app: web.Application, host: str, port: int, *, header_timeout: float,
                          max_connections: int, shutdown_timeout: float = 5.0) -> web.AppRunner:
    """Run ``app`` on host:port with both bounds; ``await runner.cleanup()`` to stop."""
    runner = web.AppRunner(app, keepalive_timeout=header_timeout, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await BoundedSite(runner, host, port, max_connections=max_connections).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
