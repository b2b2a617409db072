"""The mappings folder: Traefik's file-provider directory, where each API key is routed.

- ``keys``: which API keys can be written into a rule; generating and masking them.
- ``rules``: Traefik rules that match keys, written literally and read back.
- ``format``: one mapping file: what it says, and the text Routheon writes.
- ``folder``: reading a whole folder the way Traefik's file provider walks it.
- ``check``: what would make Traefik reject the folder or route a key the wrong way.
- ``verdict``: Traefik's own answer, from the ``traefik`` binary run on a copy of the folder.
- ``store``: changing the folder safely (lock, atomic writes, backups) while Traefik watches.
"""
