"""Sample files shared by tests."""

# A mapping file exactly as the seed's create-mapping script wrote it (HeaderRegexp, trailing slash).
SEED_MAPPING = """\
http:
  routers:
    llama-server-1:
      rule: "HeaderRegexp(`Authorization`, `^Bearer (API_KEY-1)$`)"
      service: llama-server-1
      entryPoints:
        - llama-servers

  services:
    llama-server-1:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:8011/"
"""


def with_earlier_body_reader(text: str, service: str) -> str:
    """A key file as ``render_mapping`` writes it, with the request-body middleware of the
    Routheon before the guard: a ``retry`` that never retries, no size limit, every path."""
    start = text.index(f"    '{service}-request-body':\n")
    end = text.index("  services:\n", start)
    earlier = (
        f"    '{service}-request-body':\n"
        "      retry:\n"
        "        attempts: 2\n"
        "        status: ['599']\n"
        "        retryNonIdempotentMethod: true\n"
        "        disableRetryOnNetworkError: true\n"
        "        maxRequestBodyBytes: -1\n"
    )
    return text[:start] + earlier + text[end:]
