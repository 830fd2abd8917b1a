"""The viewer's access token: every HTTP request and the websocket need it.

The printed URL carries the token (``?secret=``). The first request that shows it gets an
HTTP-only cookie, so that the page's assets and a reload (the trame client removes the secret
from the address bar) keep working; any request with neither is answered 403. The websocket's
own handshake checks the same token (wslink's ``authKey``).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Awaitable, Callable

__all__ = ["new_token", "token_middleware", "COOKIE"]

#: the cookie that carries the token after the first request
COOKIE = "segxai_token"


def new_token() -> str:
    """A random URL-safe token (192 bits)."""
    return secrets.token_urlsafe(24)


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def token_middleware(token: str) -> Callable:
    """An aiohttp middleware refusing (403) every request without ``token``.

    Parameters
    ----------
    token : str
        The secret of :func:`new_token`.
    """
    from aiohttp import web

    def with_cookie(response):
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    @web.middleware
    async def require_token(request: "web.Request", handler: Callable[..., Awaitable]) -> "web.StreamResponse":
        if _same(request.query.get("secret"), token):
            try:
                return with_cookie(await handler(request))
            except web.HTTPException as redirect:  # wslink answers "/" with a redirect
                raise with_cookie(redirect)
        if _same(request.cookies.get(COOKIE), token):
            if request.path in ("/", "/index.html"):  # a reload: the client needs the secret in its URL
                raise web.HTTPFound(f"/index.html?secret={token}")
            return await handler(request)
        return web.Response(status=403, text="SegXAI viewer: this address needs its access token (see the "
                                             "URL printed by segxai view)")

    return require_token
