"""Routheon: one OpenAI-compatible endpoint in front of many llama.cpp servers.

Traefik carries every token; this package holds the control plane around it: the mapping
file format and its tooling, and ``routheon-server`` (aggregated ``/v1/models``, ``/stats``).
"""

__version__ = "1.1.0"
