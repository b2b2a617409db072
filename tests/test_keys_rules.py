"""Key validation and rule building with hostile keys: every accepted key reads back as itself."""

import re
from pathlib import Path

import pytest

from routheon.mappings.keys import InvalidKeyError, generate_key, key_warnings, mask_key, validate_key
from routheon.mappings.format import MappingSpec, parse_rendered, render_mapping
from routheon.mappings import rules
from routheon.mappings.rules import header_rule, rule_keys, single_key_guards

HOSTILE_KEYS = [
    "k.y+2$",
    r"back\slash\\end",
    "$(touch${IFS}x);rm${IFS}-rf${IFS}*&&!#:|>",
    "{single}braces{",
    "^.*$",
    "(a|b)+[c]?",
    "%s%n%x{0}",
    "-starts-with-dash",
    "#comment-like",
    "colon:and,comma[x]",
]

REFUSED = {
    "": "empty",
    "has space": "whitespace",
    "tab\there": "whitespace",
    "new\nline": "whitespace",
    "nul\x00": "control",
    "bell\x07": "control",
    "ключ": "non-ASCII",
    "quote'd": "single quote",
    'dquote"d': "double quote",
    "back`tick": "backtick",
    "go{{template}}": "Go template",
    "close}}": "Go template",
    "x" * 1025: "longer than",
}


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_printable_keys_are_accepted_and_read_back_literally(key: str) -> None:
    validate_key(key)
    clauses = rule_keys(header_rule([key]))
    assert clauses is not None
    assert [(clause.key, clause.regex) for clause in clauses] == [(key, False)]


@pytest.mark.parametrize(("key", "reason"), REFUSED.items())
def test_unsafe_keys_are_refused_with_a_reason(key: str, reason: str) -> None:
    with pytest.raises(InvalidKeyError) as caught:
        validate_key(key)
    message = str(caught.value)
    assert reason.lower() in message.lower() or reason in message
    assert "\n" not in message
    if len(key) > 3:
        assert key not in message  # the reason never echoes the key


def test_several_keys_make_one_rule_that_reads_back_in_order() -> None:
    rule = header_rule(HOSTILE_KEYS)
    clauses = rule_keys(rule)
    assert clauses is not None
    assert [clause.key for clause in clauses] == HOSTILE_KEYS


def python_guards(key: str) -> list[re.Pattern[str]]:
    """The guards as Python reads them: Go's ``$`` ends the text, Python's ``\\Z`` does (its ``$`` allows a newline)."""
    return [re.compile(guard.replace("(?:$|", "(?:\\Z|")) for guard in single_key_guards(key)]


@pytest.mark.parametrize("key", [*HOSTILE_KEYS, "k", "x" * 1024, "a" * 248 + "$b" + "c" * 7])
def test_a_guard_matches_every_value_but_its_own_key(key: str) -> None:
    own = f"Bearer {key}"
    guards = python_guards(key)
    assert len(guards) == len(own) // 256 + 1  # Go refuses expressions nested deeper than 1000
    others = {"", "Basic eDp5", "Bearer", "Bearer ", own + " ", own + "\n", own * 2}
    for cut in range(len(own) + 1):
        others |= {own[:cut], own[:cut] + "?", own[:cut] + own[cut + 1 :], own[:cut] + "\\" + own[cut:]}
    others.discard(own)
    assert not any(guard.match(own) for guard in guards)
    missed = [value for value in others if not any(guard.match(value) for guard in guards)]
    assert missed == []


def test_guarded_clauses_read_back_and_guards_for_another_key_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-guarded-0123456789"
    (clause,) = rule_keys(header_rule([key])) or ()
    assert (clause.key, clause.guarded) == (key, True)
    two = rule_keys(header_rule([key, "k)y||z"])) or ()
    assert [(each.key, each.guarded) for each in two] == [(key, True), ("k)y||z", True)]
    (plain,) = rule_keys(f"Header(`Authorization`, `Bearer {key}`)") or ()
    assert (plain.key, plain.guarded) == (key, False)
    (edited,) = rule_keys(header_rule([key]).replace(key, "sk-edited-by-hand-0123")) or ()
    assert (edited.key, edited.guarded, edited.stale_guard) == ("sk-edited-by-hand-0123", False, True)
    longest = "k" * 600
    windows = rules.single_key_guards(longest)
    monkeypatch.setattr(rules, "GUARD_LENGTH", 128)  # a later Routheon may cut guards elsewhere
    assert rules.single_key_guards(longest) != windows
    (older,) = rule_keys(f"Header(`Authorization`, `Bearer {longest}`)" + "".join(
        f" && !HeaderRegexp(`Authorization`, `{guard}`)" for guard in windows)) or ()
    assert (older.guarded, older.stale_guard) == (True, False)
    assert rule_keys(f"Header(`Authorization`, `Bearer {key}`) && !HeaderRegexp(`Authorization`, `.`)") is None


def test_rule_builder_refuses_an_unsafe_key() -> None:
    with pytest.raises(InvalidKeyError):
        header_rule(["good-key-0123456789", "bad`key"])


def test_seed_regexp_rules_are_read_and_told_apart() -> None:
    (plain,) = rule_keys("HeaderRegexp(`Authorization`, `^Bearer (API_KEY-1)$`)") or ()
    assert (plain.key, plain.regex, plain.literal) == ("API_KEY-1", True, True)
    (bare,) = rule_keys("HeaderRegexp(`Authorization`, `^Bearer API_KEY-2$`)") or ()
    assert (bare.key, bare.literal) == ("API_KEY-2", True)
    (pattern,) = rule_keys("HeaderRegexp(`Authorization`, `^Bearer (k.y+2$)$`)") or ()
    assert pattern.regex and not pattern.literal
    (escaped,) = rule_keys(r"HeaderRegexp(`Authorization`, `^Bearer k\.y\+2$`)") or ()
    assert (escaped.key, escaped.literal) == ("k.y+2", True)


def test_rules_that_are_not_only_keys_are_not_read_as_keys() -> None:
    assert rule_keys("PathPrefix(`/`)") is None
    assert rule_keys("Header(`Authorization`, `Bearer a`) && Path(`/x`)") is None
    assert rule_keys("Header(`X-Other`, `Bearer a`)") is None
    # a guard whose string this reader cannot decode (Go rejects it too): not understood, not a crash
    assert rule_keys('Header(`Authorization`, `Bearer a`) && !HeaderRegexp(`Authorization`, "\\x")') is None


def test_rendered_file_holds_hostile_keys_verbatim(tmp_path: Path) -> None:
    spec = MappingSpec("svc", ("http://127.0.0.1:8011",), tuple(HOSTILE_KEYS), error_pages=True)
    text = render_mapping(spec)
    mapping = parse_rendered(text, spec, tmp_path / "svc.yml")
    assert mapping.keys() == HOSTILE_KEYS
    assert "{{" not in text


@pytest.mark.parametrize("name", ["true", "null", "123", "1e3", "a.b_c-d"])
def test_service_names_yaml_would_retype_stay_strings(name: str, tmp_path: Path) -> None:
    spec = MappingSpec(name, ("http://127.0.0.1:8011",), ("key-0123456789abcdef",))
    mapping = parse_rendered(render_mapping(spec), spec, tmp_path / spec.file_name)
    assert mapping.routers[0].service == name


@pytest.mark.parametrize("name", ["", "-x", "a/b", "../x", "a b", "x.yml", "x.bak", "ü"])
def test_unsafe_service_names_are_refused(name: str) -> None:
    spec = MappingSpec(name, ("http://127.0.0.1:8011",), ("key-0123456789abcdef",))
    with pytest.raises(ValueError, match="service name"):
        spec.validate()


@pytest.mark.parametrize("url", ["127.0.0.1:8011", "ftp://x", "http://", "http://h:99999", "http://h/'x", "http://h/{{x}}"])
def test_bad_backend_urls_are_refused(url: str) -> None:
    spec = MappingSpec("svc", (url,), ("key-0123456789abcdef",))
    with pytest.raises(ValueError, match="backend URL"):
        spec.validate()


def test_generated_keys_are_long_valid_and_distinct() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        validate_key(key)
        assert len(key) >= 40 and not key_warnings(key)


def test_short_keys_are_allowed_but_warned_about() -> None:
    validate_key("abc")
    assert "16" in key_warnings("abc")[0]


def test_masked_keys_do_not_reveal_the_key() -> None:
    key = generate_key()
    masked = mask_key(key)
    assert masked.startswith(key[:4]) and masked.endswith(key[-4:])
    assert len(masked) < len(key) // 2
    assert mask_key("short") == "*****"
