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


REDACTED = "<redacted>"
# Values Traefik's error texts quote: "Bearer KEY" anywhere, a rule's raw strings (`...`, a key
# or a regular expression holding one), Go's double-quoted strings that are not plain names
# ("Bearer KEY", a URL; a name such as "routheon-errors@file" or "nofunc" says what is wrong
# and stays), and the credentials of a URL.
_BEARER_VALUE = re.compile(r"(?i)\b(Bearer)\s+[^\s`'\"]+")
_RAW_STRING = re.compile(r"`[^`]*`")
_GO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_NAME = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._@-]{0,99})?")
_USERINFO_IN_TEXT = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@`'\"]*@")
# A word shorter than this is not taken out everywhere it occurs ("Bearer x" would redact every x);
# the patterns above still take it out where it follows Bearer or is quoted.
_MIN_SECRET = 6


def secrets_in(text: str) -> set[str]:
    """The values ``text`` (a mapping file) sends as ``Bearer``: the keys it routes, also in a broken file.

    Traefik's errors may quote such a key without its ``Bearer`` (a key pasted where a name, a
    number or a duration belongs): ``redact`` takes these out wherever they occur.
    """
    found: set[str] = set()
    for match in re.finditer(r"(?i)\bBearer\s+([^\s`'\"]+)", text):
        token = match.group(1)
        found |= {token, token.rstrip("$)"), token.replace("\\", "").rstrip("$)")}
    return {secret for secret in found if len(secret) >= _MIN_SECRET}


def redact(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """``text`` (an error Traefik wrote) without keys, rules or credentials, still saying what is wrong.

    ``secrets`` are taken out first, longest first: the routers' rules (Traefik quotes a rule it
    cannot parse whole, twice) and the keys of the folder (``secrets_in``). Then every Bearer
    value, raw string, non-name Go string and URL credential: what an error quotes from a file
    that Routheon could not read at all. Routheon shows these texts on /health, which anyone may
    ask without a key, and in its logs and command output.
    """
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    text = _BEARER_VALUE.sub(rf"\1 {REDACTED}", text)
    text = _RAW_STRING.sub(f"`{REDACTED}`", text)
    return _GO_STRING.sub(lambda match: match.group() if _NAME.fullmatch(match.group(1)) else f'"{REDACTED}"', text)
