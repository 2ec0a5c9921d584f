"""The admin API's boundary with aiohttp: its request limits on top of aiohttp's parser, and back.

aiohttp parses HTTP/1.1 (and refuses what its parser cannot read with a 400
of its own). :func:`read_request` then applies the admin API's stricter rules
and turns aiohttp's request into a library-free
:class:`~lb.control.admin_messages.Request`; :func:`to_web` turns a
:class:`~lb.control.admin_messages.Response` into aiohttp's, always closing
the connection. Everything refused here raises
:class:`~lb.control.admin_messages.AdminHttpError` with its status.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from lb.control.admin_auth import peer_key
from lb.control.admin_connections import GuardedProtocol
from lb.control.admin_messages import AdminHttpError, Request, Response

#: Largest request line plus headers, in bytes.
MAX_REQUEST_HEAD = 8192
#: Most header lines in one request.
MAX_HEADERS = 64
#: Largest request body, in bytes (no route reads one; it is drained and ignored).
MAX_BODY = 1024
#: The only versions served; aiohttp also parses HTTP/0.9 and "HTTP/2.0" request lines.
HTTP_VERSIONS = ((1, 0), (1, 1))

_METHOD = re.compile(r"[A-Z]{1,16}")
# A repeated header among these is ambiguous, so the request is refused.
_SINGLETON_HEADERS = ("authorization", "content-length", "transfer-encoding", "host")


class ClientNoiseLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp reports every malformed request with a traceback at ERROR; on the admin port that is
    a client's mistake, so it becomes one DEBUG line (the server logs its own handler errors)."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: Any) -> None:
        detail = exc_info if isinstance(exc_info, BaseException) else ""
        self.debug("%s: %s", str(msg) % args if args else msg, detail)


async def read_request(http_request: web.BaseRequest, conn: GuardedProtocol | None, read_timeout: float) -> Request:
    """The admin request in ``http_request``, its body (if any) drained within the read deadline."""
    method, target = http_request.method, http_request.raw_path
    if not _METHOD.fullmatch(method) or not target.startswith("/"):
        raise AdminHttpError(400, "malformed request line")
    raw_headers = http_request.raw_headers
    if len(raw_headers) > MAX_HEADERS:
        raise AdminHttpError(431, f"more than {MAX_HEADERS} header fields")
    head_size = len(method) + len(target) + 12 + sum(len(k) + len(v) + 4 for k, v in raw_headers)
    if head_size > MAX_REQUEST_HEAD:
        raise AdminHttpError(431, f"request head exceeds {MAX_REQUEST_HEAD} bytes")
    fields = http_request.headers
    for name in _SINGLETON_HEADERS:
        if len(fields.getall(name, ())) > 1:
            raise AdminHttpError(400, f"repeated {name} header")
    if "transfer-encoding" in fields:
        raise AdminHttpError(501, "chunked request bodies are not supported")
    length = http_request.content_length or 0
    if length > MAX_BODY:
        raise AdminHttpError(413, f"request body exceeds {MAX_BODY} bytes")
    if length:
        # Drained and ignored (no route takes a body), within what is left of the read deadline.
        left = conn.read_time_left() if conn is not None else read_timeout
        try:
            async with asyncio.timeout(left):
                await http_request.read()
        except TimeoutError:
            raise AdminHttpError(408, "request not received in time") from None
    split = urlsplit(target)
    headers = {k.lower(): v for k, v in fields.items()}
    if conn is not None:
        peer = conn.peer
    else:
        transport = http_request.transport
        peer = peer_key(transport.get_extra_info("peername") if transport is not None else None)
    return Request(method, split.path, split.query, headers, peer)


def to_web(response: Response) -> web.Response:
    """aiohttp's response for ``response``: never cached, never sniffed, and ``Connection: close``."""
    headers = {
        "Content-Type": response.content_type,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    headers.update(response.headers)
    web_response = web.Response(status=response.status, body=response.body, headers=headers)
    web_response.force_close()  # one request per connection
    return web_response
