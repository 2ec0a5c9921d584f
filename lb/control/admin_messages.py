"""The admin API's request and response records, and the helpers its handlers share.

Independent of the HTTP library: :mod:`lb.control.admin_http` turns aiohttp's
request into a :class:`Request` and a :class:`Response` back into aiohttp's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

#: Most query fields parsed from one request target.
MAX_QUERY_FIELDS = 16

JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # not percent-decoded: only exact matches route anywhere
    query: str  # raw; parsed by the routes that take parameters, after authentication
    headers: Mapping[str, str]  # lower-case names
    peer: str  # rate-limit key: IPv4 address, IPv6 /64, or "local"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """One entry of the route table: exactly one method per path."""

    method: str
    path: str
    handler: Handler
    summary: str


class AdminHttpError(Exception):
    """A request the admin API refuses: its status and a message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_response(status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(payload, default=_json_default, separators=(",", ":")).encode("utf-8") + b"\n"
    return Response(status, body, JSON_CONTENT_TYPE, headers)


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


def query_params(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise AdminHttpError(400, "malformed query string") from None


def single_param(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise AdminHttpError(400, f"{name} given more than once")
    return values[0]


def exception_message(exc: Exception, default: str) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return default
