"""Small folders that Traefik applies or rejects, for checking that Routheon agrees with Traefik.

Each case is one file dropped next to a valid key mapping. ``applied`` is what Traefik 3.7.15
did with the folder (measured; the tests ask the real binary again every run). ``keys`` lists
the API keys the case's routers route when Traefik applies it: Routheon must see each of them,
or ``check`` must report the router as one it cannot manage (``unmanaged``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from routheon.mappings.format import MappingSpec
from routheon.mappings.store import add_mapping


@dataclass(frozen=True)
class Case:
    name: str
    file: str
    text: str
    applied: bool
    keys: tuple[str, ...] = ()
    unmanaged: bool = False


def _router(name: str, rule: str, extra: str = "") -> str:
    return (
        "http:\n  routers:\n"
        f"    {name}:\n      rule: '{rule}'\n      service: {name}\n{extra}"
        f"  services:\n    {name}:\n      loadBalancer:\n        servers:\n          - url: http://127.0.0.1:8013\n"
    )


# Broken hand-written files with a key in them: Traefik's error texts quote keys, rules and
# URLs (measured with 3.7.15: a v2-style rule's error quotes it twice); no output of Routheon
# may show them (tests/test_redaction.py greps every one for this key's tail).
LEAK = "sk-leak-0123456789abcdef"
LEAK_TAIL = "0123456789abcdef"
_LEAK_RULE = f"Header(`Authorization`, `Bearer {LEAK}`)"

ALIASES = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)
)

CASES = (
    # rejected: Traefik ignores the whole folder
    Case("misspelt service field", "typo2.yml", _router("typo2", "PathPrefix(`/t2`)").replace("loadBalancer:", "loadbalancers:"), False),
    Case("misspelt router field", "typo.yml", _router("typo", "PathPrefix(`/typo`)").replace("service:", "sevrice:"), False),
    Case("duration in words", "hc.yml", _router("hc", "PathPrefix(`/hc`)").replace(
        "        servers:", "        healthCheck:\n          path: /health\n          timeout: three seconds\n        servers:"), False),
    Case("unknown middleware type", "mw.yml", "http:\n  middlewares:\n    slow:\n      rateLimiter:\n        average: 5\n", False),
    Case("unknown field in udp", "udp.yml", "udp:\n  routerz: {}\n", False),
    Case("broken file in a subfolder", "nested/deeper/bad.yaml", "http:\n  routers: {x: [}\n", False),
    Case("broken file in a hidden subfolder", ".old/bad.yml", "http: {routers: {r: {rule: 'Path(`/`)', service: s}}\n", False),
    Case("broken TOML file", "extra.toml", "[http.routers.t\nrule = 1\n", False),
    Case("alias bomb", "bomb.yml", ALIASES, False),
    Case("template error", "tpl.yml", "# {{ .Missing }}\nhttp: {}\n", False),
    Case("tab indentation", "tabs.yml", "http:\n\trouters: {}\n", False),
    Case("top level is a list", "list.yml", "- http\n- tcp\n", False),
    Case("key twice in one map", "twice.yml", "http:\n  middlewares: {}\n  middlewares: {}\n", False),
    Case("priority in words", "prio.yml", _router("prio", "PathPrefix(`/p`)", "      priority: high\n"), False),
    # applied: Traefik routes by the folder
    Case("byte order mark", "bom.yml", "\ufeff" + _router("bom", "Header(`Authorization`, `Bearer sk-bom-000000000000`)"), True,
         ("sk-bom-000000000000",)),
    Case("second document ignored", "docs.yml", _router("docs", "Header(`Authorization`, `Bearer sk-docs-00000000000`)")
         + "---\nhttp:\n  routers: [not, what, traefik, reads]\n", True, ("sk-docs-00000000000",)),
    Case("template comment", "note.yml", "{{/* written by hand */}}\n" + _router("note", "PathPrefix(`/note`)"), True),
    Case("empty file", "empty.yml", "", True),
    Case("comments only", "comments.yaml", "# nothing here yet\n", True),
    Case("backup and other names skipped", "b.yml.bak.20260101-000000", "http: [", True),
    Case("valid TOML key router", "keys.toml", "[http.routers.tk]\nrule = \"Header(`Authorization`, `Bearer sk-toml-0000000000`)\"\n"
         "service = \"tk\"\n[[http.services.tk.loadBalancer.servers]]\nurl = \"http://127.0.0.1:8014\"\n", True,
         ("sk-toml-0000000000",), unmanaged=True),
    Case("double-quoted rule strings", "dq.yml", _router("dq", 'Header("Authorization", "Bearer sk-dq-000000000000")'), True,
         ("sk-dq-000000000000",)),
    Case("lowercase header name", "lc.yml", _router("lc", "Header(`authorization`, `Bearer sk-lc-000000000000`)"), True,
         ("sk-lc-000000000000",)),
    Case("key file parked in a subfolder", "disabled/parked.yml", _router("parked", "Header(`Authorization`, `Bearer sk-parked-0000000`)"),
         True, ("sk-parked-0000000",)),
    Case("router with a missing middleware", "nomw.yml", _router("nomw", "PathPrefix(`/nomw`)", "      middlewares: [absent]\n"), True),
    Case("servers written as a map", "map.yml", _router("map", "PathPrefix(`/map`)").replace(
        "          - url: http://127.0.0.1:8013\n", "          first:\n            url: http://127.0.0.1:8013\n"), True),
    # keys in broken files (LEAK): rejected folders
    Case("broken YAML holding a key", "esc.yml", _router("esc", _LEAK_RULE).replace("'", '"').replace(LEAK, LEAK + "\\q"), False),
    Case("a key where a number belongs", "num.yml", _router("num", _LEAK_RULE, f"      priority: Bearer {LEAK}\n"), False),
    Case("a key where a field name belongs", "field.yml", _router("field", _LEAK_RULE, f"      {LEAK}: 1\n"), False),
    Case("a key where a duration belongs", "dur.yml", _router("dur", _LEAK_RULE).replace(
        "        servers:", f"        healthCheck:\n          path: /health\n          interval: {LEAK}\n        servers:"), False),
    Case("a template error in a key rule", "tplkey.yml", _router("tplkey", f"Header(`Authorization`, `Bearer {LEAK}{{{{ .Missing }}}}`)"), False),
    Case("a template function on a key", "tplfn.yml", _router("tplfn", f'Header(`Authorization`, `Bearer {{{{ "{LEAK}" | nofunc }}}}`)'), False),
    Case("a broken TOML key rule", "leak.toml", f"[http.routers.t]\nrule = Header(`Authorization`, `Bearer {LEAK}`)\n", False),
    # keys in broken files (LEAK): Traefik applies the folder and disables the router
    Case("Traefik v2 HeadersRegexp", "v2.yml", _router("v2", f"HeadersRegexp(`Authorization`, `^Bearer {LEAK}$`)"), True),
    Case("bad regular expression with a key", "re.yml", _router("re", f"HeaderRegexp(`Authorization`, `^Bearer {LEAK}(`)"), True),
    Case("unknown matcher with a key", "hedaer.yml", _router("hedaer", f"Hedaer(`Authorization`, `Bearer {LEAK}`)"), True),
    Case("a key rule without its header name", "half.yml", _router("half", f"Header(`Bearer {LEAK}`)"), True),
    Case("an unclosed key rule", "open.yml", _router("open", f"Header(`Authorization`, `Bearer {LEAK}`"), True),
    Case("a key in a broken backend URL", "url.yml", _router("url", _LEAK_RULE).replace(
        "http://127.0.0.1:8013", f"http://user:{LEAK}@[::1"), True),
    Case("key clause joined with a path test", "and.yml", _router("and", "Header(`Authorization`, `Bearer sk-and-00000000000`) && PathPrefix(`/v1`)"),
         True, ("sk-and-00000000000",), unmanaged=True),
)


def folder_with(root: Path, case: Case, key: str) -> Path:
    """``root/mappings``: a valid key mapping routing ``key``, and the case's file beside it."""
    folder = root / "mappings"
    folder.mkdir()
    add_mapping(folder, MappingSpec("valid", ("http://127.0.0.1:8011",), (key,)))
    target = folder / case.file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(case.text, encoding="utf-8")
    return folder
