"""Traefik rules that match API keys: building them literally and reading keys back out.

Routheon writes Traefik 3's exact ``Header`` matcher, which compares the whole header value
with the string given, so a key matches only itself whatever characters it holds. Files in the
seed's format use ``HeaderRegexp`` with the key pasted into a regular expression; those are
still read (to list, rotate and check them) and told apart, because a key holding ``.``, ``+``
or ``*`` there matches other keys too.

Traefik's matchers accept a request when any one of a header's values matches, so a request
carrying a second ``Authorization`` header would reach a key's service beside the key. No
matcher counts values, but a regular expression can match every value but one: each key
Routheon writes is followed by ``!HeaderRegexp`` tests (its guard, ``single_key_guards``) that
refuse a request holding any other Authorization value. Two different headers then match no
key router and get the 401 of routheon-server.yml (or the plugin's, for granted keys); the
same key sent twice still routes, as it is one key. What guards cost Traefik (nothing per
request, memory and start-up per key): docs/mappings.md, "Two Authorization headers".
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from routheon.mappings.keys import validate_key

AUTH_HEADER = "Authorization"
SCHEME = "Bearer "
_SEPARATOR = " || "
_AND_NOT = " && !"
_GUARD_START = "(?s)^"
# Characters of "Bearer KEY" per guard expression. Go's regexp parser refuses a tree nested
# deeper than 1000 and each character here nests two (a concatenation inside an alternation),
# so the longest key (1024 characters, 1031 with "Bearer ") takes five expressions of 256.
# Measured with Traefik 3.7.15 (tests/test_traefik_routing.py has the longest key): one
# expression over 480 characters routes, over 500 the router is disabled; 256 leaves room.
GUARD_LENGTH = 256

# A Traefik rule is a Go expression: its strings are raw (`...`, no backtick inside) or
# interpreted ("...", with Go's escapes); header names are compared case-insensitively.
_STRING = r"(?:`[^`]*`|\"(?:[^\"\\]|\\.)*\")"
_CLAUSE = re.compile(
    rf"\s*(?P<matcher>Header|HeaderRegexp)\(\s*(?P<name>{_STRING})\s*,\s*(?P<value>{_STRING})\s*\)\s*"
)
_GUARD = re.compile(rf"&&\s*!\s*HeaderRegexp\(\s*(?P<name>{_STRING})\s*,\s*(?P<value>{_STRING})\s*\)\s*")
_OPEN, _CLOSE = re.compile(r"\s*\("), re.compile(r"\)\s*")
_OR = re.compile(r"\|\|")
_AUTH_TEST = re.compile(r"\bHeader(?:Regexp)?\(\s*[`\"]Authorization[`\"]", re.IGNORECASE)
_NEGATED_HEADER_TEST = re.compile(rf"!\s*Header(?:Regexp)?\(\s*{_STRING}\s*,\s*{_STRING}\s*\)", re.IGNORECASE)
_REGEX_META = set(".^$*+?{}[]|()\\")
# What Go's regexp reads as syntax, in a class or out of it; each is escaped with a backslash.
_GO_META = _REGEX_META | {"-"}


@dataclass(frozen=True)
class KeyClause:
    """One key a rule accepts.

    ``regex`` marks the seed's ``HeaderRegexp`` form. ``literal`` says whether that expression
    matches nothing but ``key`` (always true for ``Header``). ``guarded``: the clause refuses
    a request that holds another Authorization value beside the key; ``stale_guard``: its guard
    was written for another key, so it refuses every request (the key was edited by hand).
    """

    key: str
    regex: bool = False
    literal: bool = True
    text: str = ""
    guarded: bool = False
    stale_guard: bool = False


def key_clause(key: str) -> str:
    """The exact-match clause for one key, with its guard; the key must have passed validate_key."""
    guards = "".join(f"{_AND_NOT}HeaderRegexp(`{AUTH_HEADER}`, `{guard}`)" for guard in single_key_guards(key))
    return f"Header(`{AUTH_HEADER}`, `{SCHEME}{key}`){guards}"


def join_clauses(clauses: Sequence[str]) -> str:
    """Clauses that each accept one key, as one rule accepting any of them."""
    if len(clauses) == 1:
        return clauses[0]
    return _SEPARATOR.join(f"({clause})" if _AND_NOT in clause else clause for clause in clauses)


def _go_escape(text: str) -> str:
    return "".join(f"\\{char}" if char in _GO_META else char for char in text)


def _leaving(value: str, start: int, end: int) -> str:
    """An expression for the ways a string equal to ``value`` up to ``start`` leaves it before ``end``.

    At each position it leaves by ending early, by another character, or (past the last
    character) by going on.
    """
    if start == len(value):
        return "."
    char = _go_escape(value[start])
    ways = f"$|[^{char}]"
    if start + 1 < end:
        ways += f"|{char}{_leaving(value, start + 1, end)}"
    return f"(?:{ways})"


def single_key_guards(key: str) -> list[str]:
    """Go regular expressions that together match every string but ``Bearer KEY``.

    Each covers GUARD_LENGTH positions: the strings that equal ``Bearer KEY`` before them and
    differ from it within them.
    """
    value = SCHEME + key
    return [
        f"{_GUARD_START}{_go_escape(value[:start])}{_leaving(value, start, start + GUARD_LENGTH)}"
        for start in range(0, len(value) + 1, GUARD_LENGTH)
    ]


def header_rule(keys: Iterable[str]) -> str:
    """One rule that accepts any of ``keys``, each compared literally."""
    keys = list(keys)
    if not keys:
        raise ValueError("a key rule needs at least one key")
    for key in keys:
        validate_key(key)
    return join_clauses([key_clause(key) for key in keys])


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


def _guarded_clause(rule: str, position: int) -> tuple[KeyClause, int] | None:
    """The clause at ``position`` (optionally in parentheses, optionally guarded) and where it ends.

    Guards are read when they have the shape Routheon writes: ``guarded`` when they let the
    clause's own key through (those written for it, whatever GUARD_LENGTH was then), and
    ``stale_guard`` when they refuse it (written for another key: the key was edited by hand,
    and every request with it is refused). A clause with other negated tests is not one whose
    keys can be listed.
    """
    opened = _OPEN.match(rule, position)
    start = opened.end() if opened else position
    match = _CLAUSE.match(rule, start)
    clause = _clause(match) if match is not None else None
    if match is None or clause is None:
        return None
    end, guards = match.end(), []
    while guard := _GUARD.match(rule, end):
        name, value = _go_string(guard.group("name")), _go_string(guard.group("value"))
        if name is None or value is None or name.lower() != AUTH_HEADER.lower():
            return None
        guards.append(value)
        end = guard.end()
    if guards:
        if clause.regex or not all(guard.startswith(_GUARD_START) for guard in guards):
            return None
        refused = guards != single_key_guards(clause.key) and _refuses(guards, SCHEME + clause.key)
        if refused is None:
            return None
        clause = KeyClause(clause.key, text=rule[start:end].strip(), guarded=not refused, stale_guard=refused)
    if opened:
        closed = _CLOSE.match(rule, end)
        if closed is None:
            return None
        end = closed.end()
    return clause, end


def _refuses(guards: list[str], value: str) -> bool | None:
    """Whether one of ``guards`` matches ``value``; None when Python cannot read one as Go would.

    The shapes Routheon writes mean the same to Python's ``re`` for a header value (which holds
    no line break, so ``$`` ends it for both); Go-only syntax fails to compile here.
    """
    try:
        return any(re.match(guard, value) for guard in guards)
    except (re.error, RecursionError):
        return None


@functools.lru_cache(maxsize=1 << 14)
def rule_keys(rule: str) -> tuple[KeyClause, ...] | None:
    """The keys of a rule made only of Authorization clauses joined by ``||``; None otherwise.

    Cached: a folder read asks for each rule's keys about five times (listing, checks, the
    fallback twin's same rule), and checking a guarded clause rebuilds its guard: with 1,000
    one-key files, reading the folder as ``mapping check`` does took 0.92 s, 0.53 s cached.
    """
    clauses: list[KeyClause] = []
    position = 0
    while True:
        found = _guarded_clause(rule, position)
        if found is None:
            return None
        clause, position = found
        clauses.append(clause)
        if position == len(rule):
            return tuple(clauses)
        separator = _OR.match(rule, position)
        if separator is None:
            return None
        position = separator.end()


def selects_by_key(rule: str) -> bool:
    """Whether a rule routes by the Authorization header (a negated test, as in ``!HeaderRegexp``, does not)."""
    return _AUTH_TEST.search(_NEGATED_HEADER_TEST.sub("", rule)) is not None
