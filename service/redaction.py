"""Secrets kept out of text: a URL's password found, redacted, scrubbed.

A password may reach a backend inside its URL, and drivers quote URLs in
their errors (psycopg puts the whole URI, password included, in the message
of a malformed one). Every store and snapshot runs its `describe()` and the
errors it raises through `redact_url` / `scrub`; so does the server for its
start-up line, and holdfast.security puts a log filter on top of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

REDACTED = "***"


def userinfo(url: str) -> tuple[int, int] | None:
    """Where the `user[:password]` of `url` lies, as (start, end) indices,
    found by hand: a malformed URL (the one a driver quotes whole in its
    error) must be redacted too, and urllib refuses to parse some of those."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    end = len(url)
    for stop in "/?#":
        found = url.find(stop, start)
        if found >= 0:
            end = min(end, found)
    at = url.rfind("@", start, end)
    return None if at < 0 else (start, at)


def url_password(url: str) -> str | None:
    """The password of `url` as written (percent-encoded), or None."""
    span = userinfo(url)
    if span is None:
        return None
    user, colon, password = url[span[0] : span[1]].partition(":")
    return password if colon and password else None


def secrets_of(url: str) -> tuple[str, ...]:
    """The strings that give `url`'s password away: as written and decoded."""
    password = url_password(url)
    if password is None:
        return ()
    return tuple(dict.fromkeys(s for s in (password, unquote(password)) if s))


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***` (user, host and the rest kept)."""
    span = userinfo(url)
    if span is None or url_password(url) is None:
        return url
    user = url[span[0] : span[1]].partition(":")[0]
    return f"{url[: span[0]]}{user}:{REDACTED}{url[span[1] :]}"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret in it replaced by `***`, longest first (so a
    secret that contains another goes whole)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text
