"""Build proxies: checked before anything runs, and their credentials kept out of every file,
argv and message.

The values reach `docker build` only through its environment: the argv names the
predefined proxy args (`--build-arg HTTP_PROXY`, no value), which the docker CLI and buildx
read from the environment. So `ps`, build/logs/commands.sh, the build logs and --dry-run
show the names; reports and messages show `redact`ed URLs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from builder.errors import ConfigError

SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")


def redact(url: str | None) -> str | None:
    """`http://user:p@ss@proxy:3128` -> `http://***@proxy:3128`.

    The user-info ends at the *last* '@' before the host: a password may hold '@', '/' or
    ':' unencoded, so everything up to that '@' goes, whatever it looks like.
    """
    if not url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


def check(option: str, url: str | None) -> None:
    """A proxy URL docker, pip, apt and curl all understand: SCHEME://[USER:PASS@]HOST[:PORT]."""
    if not url:
        return
    shown = redact(url)
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise ConfigError(f"{option} {shown!r}: holds spaces or control characters; pass a URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsed only to refuse a non-numeric port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise ConfigError(
            f"{option} {shown!r}: expected SCHEME://[USER:PASSWORD@]HOST[:PORT] with scheme "
            f"{'/'.join(SCHEMES[:2])}, e.g. http://proxy.corp:3128"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{option} {shown!r}: the user or password holds '/', '?' or '#', or the URL has a path; "
            "percent-encode them (%2F, %3F, %23)"
        )
