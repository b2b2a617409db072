"""Traefik rules that match API keys: building them literally and reading keys back out.

Routheon writes Traefik 3's exact ``Header`` matcher, which compares the whole header value
with the string given, so a key matches only itself whatever characters it holds. Files in the
seed's format use ``HeaderRegexp`` with the key pasted into a regular expression; those are
still read (to list, rotate and check them) and told apart, because a key holding ``.``, ``+``
or ``*`` there matches other keys too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass

from routheon.mappings.keys import validate_key

AUTH_HEADER = "Authorization"
SCHEME = "Bearer "
_SEPARATOR = " || "

# A Traefik rule is a Go expression: its strings are raw (`...`, no backtick inside) or
# interpreted ("...", with Go's escapes); header names are compared case-insensitively.
_STRING = r"(?:`[^`]*`|\"(?:[^\"\\]|\\.)*\")"
_CLAUSE = re.compile(
    rf"\s*(?P<matcher>Header|HeaderRegexp)\(\s*(?P<name>{_STRING})\s*,\s*(?P<value>{_STRING})\s*\)\s*"
)
_OR = re.compile(r"\|\|")
_AUTH_TEST = re.compile(r"\bHeader(?:Regexp)?\(\s*[`\"]Authorization[`\"]", re.IGNORECASE)
_NEGATED_HEADER_TEST = re.compile(r"!\s*Header(?:Regexp)?\([^)]*\)", re.IGNORECASE)
_REGEX_META = set(".^$*+?{}[]|()\\")


@dataclass(frozen=True)
class KeyClause:
    """One key a rule accepts.

    ``regex`` marks the seed's ``HeaderRegexp`` form. ``literal`` says whether that expression
    matches nothing but ``key`` (always true for ``Header``).
    """

    key: str
    regex: bool = False
    literal: bool = True
    text: str = ""


def key_clause(key: str) -> str:
    """The exact-match clause for one key; the key must have passed validate_key."""
    return f"Header(`{AUTH_HEADER}`, `{SCHEME}{key}`)"


def join_clauses(clauses: Iterable[str]) -> str:
    """Clauses that each accept one key, as one rule accepting any of them."""
    return _SEPARATOR.join(clauses)


def header_rule(keys: Iterable[str]) -> str:
    """One rule that accepts any of ``keys``, each compared literally."""
    keys = list(keys)
    if not keys:
        raise ValueError("a key rule needs at least one key")
    for key in keys:
        validate_key(key)
    return join_clauses(key_clause(key) for key in keys)


def _unescape_regex(body: str, text: str) -> KeyClause:
    """Read the seed's ``(KEY)`` / ``KEY`` expression as the key its author meant."""
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1]
    chars: list[str] = []
    literal = True
    escaped = False
    for char in body:
        if escaped:
            if char.isalnum():
                literal = False  # \d, \w, ...: a class, not a character
            chars.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            if char in _REGEX_META:
                literal = False
            chars.append(char)
    if escaped:
        literal = False
        chars.append("\\")
    return KeyClause("".join(chars), regex=True, literal=literal, text=text)


def _go_string(literal: str) -> str | None:
    """The value of a Go string literal, or None for one this reader does not handle."""
    if literal.startswith("`"):
        return literal[1:-1]
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def _clause(match: re.Match[str]) -> KeyClause | None:
    """The key of one ``Header``/``HeaderRegexp`` test of the Authorization header, if it is one."""
    name, value = _go_string(match.group("name")), _go_string(match.group("value"))
    if name is None or value is None or name.lower() != AUTH_HEADER.lower():
        return None
    text = match.group().strip()
    if match.group("matcher") == "Header":
        return KeyClause(value[len(SCHEME) :], text=text) if value.startswith(SCHEME) else None
    if value.startswith(f"^{SCHEME}") and value.endswith("$"):
        return _unescape_regex(value[len(SCHEME) + 1 : -1], text)
    return None


def rule_keys(rule: str) -> tuple[KeyClause, ...] | None:
    """The keys of a rule made only of Authorization clauses joined by ``||``; None otherwise."""
    clauses: list[KeyClause] = []
    position = 0
    while True:
        match = _CLAUSE.match(rule, position)
        clause = _clause(match) if match is not None else None
        if match is None or clause is None:
            return None
        clauses.append(clause)
        position = match.end()
        if position == len(rule):
            return tuple(clauses)
        separator = _OR.match(rule, position)
        if separator is None:
            return None
        position = separator.end()


def selects_by_key(rule: str) -> bool:
    """Whether a rule routes by the Authorization header (a negated test, as in ``!HeaderRegexp``, does not)."""
    return _AUTH_TEST.search(_NEGATED_HEADER_TEST.sub("", rule)) is not None
