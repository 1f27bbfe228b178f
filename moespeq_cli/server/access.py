"""Who may reach the server: a server bound to loopback answers only requests addressed
to a loopback name (``Gate``, against a web page's DNS rebinding); the API key is
checked per route (app.py)."""

from __future__ import annotations

from moespeq_cli.server.errors import ApiError
from moespeq_cli.text import printable


def loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, as bound or as a Host header's without
    its port) is this machine's loopback: ``localhost`` (and RFC 6761's ``*.localhost``),
    127.0.0.0/8, ::1."""
    import ipaddress
    import socket

    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:  # IPv4's short forms, as a browser normalises them (127.1, 0x7f.1)
            ip = ipaddress.ip_address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def host_name(header: str) -> str:
    """The name of a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Gate:
    """ASGI middleware in front of the routes. A trailing slash is dropped (``/health/``
    is ``/health``: no redirect to a URL built from the Host header). A server bound to
    loopback answers only requests addressed to a loopback name: a web page's DNS
    rebinding (its own name re-pointed at 127.0.0.1, to read the answers) is refused with
    403. Bound to another address, the operator chose who may reach it (``--api-key``)."""

    def __init__(self, app, bind: str, log, address: str | None = None):
        # checked where the socket is bound to loopback (its address, not the name given:
        # `--host ip6-localhost` or the machine's own name bind loopback too)
        self.app, self.check, self.bind, self.log = app, loopback(address or bind), bind, log

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                scope = dict(scope, path=path.rstrip("/") or "/")
            host = dict(scope.get("headers") or []).get(b"host")
            name = host_name(host.decode("latin-1")) if host else None
            if self.check and name is not None and not loopback(name) and name != self.bind:
                from starlette.responses import JSONResponse

                shown = printable(name, 60)
                e = ApiError(
                    403,
                    f"this server on {self.bind} answers requests for localhost only, not for {shown!r} (a web page "
                    "reaching it through its own name is refused); a proxy in front must send its own Host "
                    "(nginx's default)",
                    "host_not_allowed",
                )
                self.log(scope.get("method", "?"), scope["path"], 403, e.message)
                await JSONResponse(e.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
