#!/usr/bin/env bash
# create-mapping.sh: route an API key to a llama-server before it starts.
#
# Chain it before `exec llama-server ...` in a service unit; running it again with the same
# arguments changes nothing. It is a thin wrapper around `routheon mapping add --replace`, so
# the files it writes are exactly those of the routheon command (one implementation of the
# format, atomic writes, backups as NAME.yml.bak.TIMESTAMP, mode 0640).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: create-mapping.sh --port PORT --service NAME --api_key KEY [--mappings DIR] [--host URL]

Writes DIR/NAME.yml so that requests with "Authorization: Bearer KEY" reach HOST:PORT.
A different mapping already in NAME.yml, or the same key in another service's file, is
kept as a backup (FILE.bak.TIMESTAMP) and replaced. Each file keeps its newest 5 backups,
or $ROUTHEON_BACKUPS; older ones are deleted, as they hold revoked keys.

  --port PORT      port of the llama-server (required)
  --service NAME   service name, also the file name NAME.yml (required)
  --api_key KEY    API key clients send as "Authorization: Bearer KEY" (required)
  --mappings DIR   Traefik's mappings folder (default: $ROUTHEON_MAPPINGS if set,
                   else /etc/traefik/mappings)
  --host URL       scheme and host of the llama-server (default: http://127.0.0.1)
  --help           show this help

The routheon command is taken from $ROUTHEON_BIN, else from PATH, else from
~/.routheon/venv/bin/routheon.
USAGE
}

die() {
    printf 'create-mapping.sh: %s\n' "$1" >&2
    exit 2
}

port=""
service=""
api_key=""
have_key=0
# set but empty is an unset variable in a unit file: refused below, never /etc/traefik/mappings
mappings="${ROUTHEON_MAPPINGS-/etc/traefik/mappings}"
host="http://127.0.0.1"

while [ "$#" -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --port=* | --service=* | --api_key=* | --mappings=* | --host=*)
            flag="${1%%=*}"
            value="${1#*=}"
            shift
            ;;
        --port | --service | --api_key | --mappings | --host)
            [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"
            flag="$1"
            value="$2"
            shift 2
            ;;
        *)
            die "unknown argument '$1' (see --help)"
            ;;
    esac
    case "$flag" in
        --port) port="$value" ;;
        --service) service="$value" ;;
        --api_key) api_key="$value" have_key=1 ;;
        --mappings) mappings="$value" ;;
        --host) host="$value" ;;
    esac
done

[ -n "$port" ] || die "--port is required (see --help)"
[ -n "$service" ] || die "--service is required (see --help)"
[ "$have_key" = 1 ] || die "--api_key is required (see --help)"
# An empty key is an unset variable in the unit file: routheon would generate a key nobody knows.
[ -n "$api_key" ] || die "--api_key is empty (an unset variable?); give the key clients send"
# The key travels to routheon as a line: a line break would route it as two keys.
case "$api_key" in
    *$'\n'* | *$'\r'*) die "--api_key holds a line break; give one key on one line" ;;
esac
[ -n "$mappings" ] || die "--mappings is empty (an unset variable? ROUTHEON_MAPPINGS set to nothing counts too)"

if [ -n "${ROUTHEON_BIN:-}" ]; then
    routheon="$ROUTHEON_BIN"
elif command -v routheon >/dev/null 2>&1; then
    routheon="$(command -v routheon)"
elif [ -x "${HOME:-}/.routheon/venv/bin/routheon" ]; then
    routheon="$HOME/.routheon/venv/bin/routheon"
else
    # Routheon is installed from its repository (it is not on PyPI; PyPI's routheon-server is
    # the original 1.0.x, without this command): name the clone this script sits in, if it does.
    source="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." 2>/dev/null && pwd)" || source=""
    if [ -z "$source" ] || ! grep -qs '^name = "routheon"$' "$source/pyproject.toml"; then
        source="/path/to/a/clone/of/routheon"
    fi
    die "the routheon command was not found. Install Routheon from a clone of its repository
into the venv this script looks in:
  python3 -m venv ~/.routheon/venv && ~/.routheon/venv/bin/pip install '$source'
or set ROUTHEON_BIN to the routheon command."
fi

# Values travel as single --flag=VALUE arguments: never word-split, never read as options,
# never evaluated by a shell. The key goes through stdin, out of the process list.
exec "$routheon" mapping add --replace \
    "--service=$service" \
    "--port=$port" \
    "--host=$host" \
    --key-file=- \
    "--mappings=$mappings" <<<"$api_key"
