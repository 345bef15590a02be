"""Who may use the server: an access token, the Host and Origin a request names, JSON content types.

Checked for every request by one aiohttp middleware, before any handler runs:

- **Host** must be one this server answers to: loopback names, the address it is bound to, and
  ``--allowed-host`` names. A page on ``attacker.example`` whose DNS name is re-pointed at
  127.0.0.1 (DNS rebinding) sends ``Host: attacker.example`` and is refused, so it can read
  neither ``/ice`` (a TURN password) nor ``/sessions``. A server bound to every interface
  (0.0.0.0) without ``--allowed-host`` cannot know its public names and takes any Host.
- **Origin**, when a browser sends one, must be this server itself (the page) or an allowed host:
  another site's page can neither POST ``/offer`` and ``/avatar`` nor open the WebSocket.
- **Content-Type** must be ``application/json`` on the JSON routes and ``multipart/form-data`` on
  ``/avatar``. A cross-site ``text/plain`` POST is a "simple request" that browsers send without
  asking; a JSON one needs a CORS preflight, which this server never grants.
- **The token** (``--token`` or ``$LIPSTREAM_TOKEN``), when one is set, on every route but the page
  itself (``/``, ``/static/``: it has to load to ask for the token): ``Authorization: Bearer TOKEN``,
  or ``?token=`` on the WebSocket, which browsers cannot give headers. Compared in constant time.
  MQTT commands carry it as a ``"token"`` field (transport/mqtt.py).

Without a token the server trusts whoever can reach it, which is why it binds 127.0.0.1 by default
and warns (``exposure_warning``) when told to listen elsewhere without one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import urllib.parse
from typing import Awaitable, Callable

from aiohttp import web

TOKEN_ENV = "LIPSTREAM_TOKEN"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
PUBLIC_PATHS = ("/", "/static/")  # the page and its script: no secrets, and they must load to ask
UPLOAD_ROUTE = "/avatar"
SOCKET_SUFFIX = "/audio"  # GET /sessions/NAME/audio: the WebSocket, where ?token= is accepted


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(bind_host: str, token: str | None) -> str | None:
    """The warning to print when the server listens beyond loopback with no token, else None."""
    if token or is_loopback(bind_host):
        return None
    return (f"lipstream: WARNING: listening on {bind_host} without an access token: anyone who can reach "
            f"this address can start sessions, upload avatars and read the TURN password. Set --token "
            f"or ${TOKEN_ENV}, or bind 127.0.0.1.")


def _hostname(host_header: str) -> str:
    """'example.com:8080' -> 'example.com', '[::1]:8080' -> '::1' (lower case)."""
    parts = urllib.parse.urlsplit("//" + host_header)
    try:
        return (parts.hostname or "").lower()
    except ValueError:
        return ""


class Access:
    """The checks above for one server. ``allowed_hosts``: extra Host names it answers to ("*": any)."""

    def __init__(self, bind_host: str, token: str | None = None, allowed_hosts: tuple[str, ...] = ()):
        self.token = token or None
        extra = {host.lower().strip("[]") for host in allowed_hosts}
        self.configured_hosts = frozenset(extra - {"*"})
        self.any_host = "*" in extra or (_is_unspecified(bind_host) and not extra)
        self.hosts = LOOPBACK_NAMES | self.configured_hosts | {bind_host.lower().strip("[]")}

    def host_allowed(self, host_header: str | None) -> bool:
        return self.any_host or _hostname(host_header or "") in self.hosts

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """No Origin (not a browser, or a same-origin GET) is fine; else it must be this server."""
        if origin is None:
            return True
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null": a sandboxed frame, a file:// page...
        if host_header is not None and parts.netloc.lower() == host_header.lower():
            return True
        return _hostname(parts.netloc) in self.configured_hosts

    def authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token_matches(given.strip(), self.token):
            return True
        return request.path.endswith(SOCKET_SUFFIX) and token_matches(request.query.get("token"), self.token)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return _refuse(403, f"this server does not answer to the host {host!r} (see --allowed-host)")
        if not self.origin_allowed(request.headers.get("Origin"), host):
            return _refuse(403, f"requests from pages of {request.headers['Origin']!r} are not accepted")
        if request.path == "/" or request.path.startswith(PUBLIC_PATHS[1]):
            return await handler(request)
        if not self.authorized(request):
            return _refuse(401, "this server needs its access token: Authorization: Bearer TOKEN",
                           {"WWW-Authenticate": 'Bearer realm="lipstream"'})
        if request.method == "POST":
            wanted = "multipart/form-data" if request.path == UPLOAD_ROUTE else "application/json"
            if request.content_type != wanted:
                return _refuse(415, f"send {wanted}, not {request.content_type or 'no Content-Type'}")
        return await handler(request)


def _refuse(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json",
                        headers=headers)
