"""The status page at ``/`` of the admin port: one static HTML file shipped as package data.

The page holds no data. It asks the operator for the admin token, keeps it in
the tab's ``sessionStorage``, and reads the JSON API (``/services``,
``/backends``, ``/config``, ``/metrics``) with it, refreshing every few
seconds. Serving it without the token is therefore safe, which is why ``/``
is a public path.

Its inline script and style are pinned by a Content-Security-Policy built from
their SHA-256 digests, so nothing but this file's own code runs on the page
(no other origin, no injected markup).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

HTML_CONTENT_TYPE = "text/html; charset=utf-8"
STATUS_PAGE_FILE = "status_page.html"

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


@functools.cache
def status_page_html() -> bytes:
    """The page's bytes (read once from the installed package)."""
    return resources.files("lb.control").joinpath(STATUS_PAGE_FILE).read_bytes()


def _digest(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode("ascii") + "'"


@functools.cache
def status_page_headers() -> tuple[tuple[str, str], ...]:
    """Headers of the page: a CSP that allows exactly its own inline script and style, and same-origin fetches."""
    scripts = [_digest(body) for kind, body in _INLINE.findall(status_page_html()) if kind == b"script"]
    styles = [_digest(body) for kind, body in _INLINE.findall(status_page_html()) if kind == b"style"]
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src " + (" ".join(scripts) or "'none'"),
            "style-src " + (" ".join(styles) or "'none'"),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return (("Content-Security-Policy", policy), ("Referrer-Policy", "no-referrer"))
