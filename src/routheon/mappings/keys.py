"""API key rules: which keys can be written into a Traefik rule, generating and masking keys (and URL passwords).

A key ends up inside a backtick string of a Traefik rule, inside a single-quoted YAML scalar,
inside a file that Traefik first expands as a Go template. Each of those layers has characters
it would reinterpret; a key holding one of them would silently stop matching itself (or break
the whole mappings folder), so such keys are refused here, before anything is written.
"""

from __future__ import annotations

import re
import secrets

KEY_PREFIX = "sk-"
MIN_RECOMMENDED_LENGTH = 16
MAX_LENGTH = 1024

# Characters that end or escape one of the quoting layers around a key.
_QUOTING = {
    "`": "a backtick would end the Traefik rule string",
    "'": "a single quote would end the YAML string",
    '"': "a double quote is not allowed in a Traefik rule string here",
}
# Traefik expands every mapping file as a Go template before reading it as YAML.
_TEMPLATE_DELIMITERS = ("{{", "}}")


class InvalidKeyError(ValueError):
    """A key that cannot be routed literally; the message says why, without echoing the key."""


def validate_key(key: str) -> None:
    """Raise InvalidKeyError unless ``key`` can be written into a rule and match only itself."""
    if not key:
        raise InvalidKeyError("the API key is empty")
    if len(key) > MAX_LENGTH:
        raise InvalidKeyError(f"the API key is longer than {MAX_LENGTH} characters")
    for position, char in enumerate(key, start=1):
        if char in _QUOTING:
            raise InvalidKeyError(f"the API key holds {char!r} at position {position}: {_QUOTING[char]}")
        if char.isspace():
            raise InvalidKeyError(
                f"the API key holds whitespace at position {position}: HTTP clients and Traefik trim or split it"
            )
        if not char.isascii() or not char.isprintable():
            raise InvalidKeyError(
                f"the API key holds a control or non-ASCII character at position {position}:"
                " HTTP headers cannot carry it reliably"
            )
    for delimiter in _TEMPLATE_DELIMITERS:
        if delimiter in key:
            raise InvalidKeyError(
                f"the API key holds {delimiter!r}: Traefik reads mapping files as Go templates and would rewrite it"
            )


def key_warnings(key: str) -> list[str]:
    """Advice about a valid key that still works but is weak."""
    if len(key) < MIN_RECOMMENDED_LENGTH:
        return [
            f"the API key is only {len(key)} characters long; "
            f"{MIN_RECOMMENDED_LENGTH} or more are recommended (`routheon key generate` makes one)"
        ]
    return []


def generate_key() -> str:
    """A new random key: 256 bits from the OS, URL-safe, so it fits every quoting layer."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def mask_key(key: str) -> str:
    """Enough of a key to tell keys apart in a listing, never enough to use it."""
    if len(key) <= 8:
        return "*" * len(key)
    shown = 4 if len(key) >= 16 else 2
    return f"{key[:shown]}...{key[-shown:]}"


# The userinfo of a URL: everything between "scheme://" and the last "@" before the path.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def mask_url(url: str, mask: str = "***@") -> str:
    """``url`` with its credentials (``user:password@``) replaced by ``mask``: a password is a key too."""
    return _USERINFO.sub(lambda match: match.group(1) + mask, url)
