"""Usage records: what Traefik's plugin counted per API key, read back by ``routheon usage`` and
routheon-server's ``/metrics``.

The plugin (middleware ``routheon-grants``) appends one JSON line per request of a known key to
``<usage>/<YYYY-MM-DD>.<PID>.jsonl`` (docs/usage.md has the format). Python only reads them:
``records`` finds and parses the files safely, ``when`` turns ``--since``/``--until`` into a
time range, ``aggregate`` sums records per key name, model and day, ``report`` prints them.
"""

from __future__ import annotations

# Where the records live unless --usage says otherwise; the variable sets it for the routheon
# command and routheon-server alike, as $ROUTHEON_MAPPINGS does for the mappings folder.
DEFAULT_USAGE = "/var/lib/routheon/usage"
USAGE_ENV = "ROUTHEON_USAGE"
