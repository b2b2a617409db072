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
