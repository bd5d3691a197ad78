#!/usr/bin/env bash
# Installs what the real-backend tests start (tests/backends.py) when it is
# missing: PostgreSQL (initdb, pg_ctl, postgres) and Redis (redis-server,
# redis-cli), and Graphviz's `dot`, which draws `holdfast graph --format
# svg|png` (tests/test_graph.py), and Prometheus (`prometheus`, `promtool`),
# which checks and runs the alert rules and the dashboard's queries
# (tests/test_deploy.py), from Debian's packages. Silent and a no-op
# when everything is there. Run by `make test`; safe to run any number of times.
#
# `apt-get update` runs only when the install fails without it. The distro's
# own services are not started (the tests start their own servers on free
# ports): a policy-rc.d forbids it for the duration of the install, unless
# one is already in place.
set -euo pipefail

log() { echo "ensure-packages: $*" >&2; }

# An executable on PATH (`command -v` alone also answers a non-executable file).
have() { local path; path=$(command -v "$1" 2>/dev/null) && [ -x "$path" ]; }

have_postgres() {
    local initdb
    if [ -n "${HOLDFAST_PG_BINDIR:-}" ] && [ -x "$HOLDFAST_PG_BINDIR/initdb" ]; then
        return 0
    fi
    for initdb in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$initdb" ] && [ -x "$(dirname "$initdb")/pg_ctl" ] && [ -x "$(dirname "$initdb")/postgres" ] && return 0
    done
    have initdb && have pg_ctl && have postgres
}

missing=()
have_postgres || missing+=(postgresql)
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
have dot || missing+=(graphviz)
{ have prometheus && have promtool; } || missing+=(prometheus)

[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        log "missing ${missing[*]}; install them (as root: bash $0), or point"
        log "HOLDFAST_TEST_POSTGRES / HOLDFAST_TEST_REDIS / HOLDFAST_TEST_REDIS_CLUSTER at running servers"
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]} and no apt-get to install them with; install them by hand"
    exit 1
fi

out=$(mktemp)
policy=/usr/sbin/policy-rc.d
made_policy=
cleanup() {
    rm -f "$out"
    if [ -n "$made_policy" ]; then "${sudo[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, tests/ensure-packages.sh: no service starts during the install\nexit 101\n' |
        "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    made_policy=1
fi

apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
     -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log "installing ${missing[*]}"
if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
    if ! { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${missing[@]}"; } >>"$out" 2>&1; then
        cat "$out" >&2
        log "apt-get install ${missing[*]} failed"
        exit 1
    fi
fi

# What was asked for must now be there.
have_postgres || { log "PostgreSQL still missing after the install"; exit 1; }
have redis-server || { log "redis-server still missing after the install"; exit 1; }
have redis-cli || { log "redis-cli still missing after the install"; exit 1; }
have dot || { log "Graphviz's dot still missing after the install"; exit 1; }
{ have prometheus && have promtool; } || { log "prometheus or promtool still missing after the install"; exit 1; }
