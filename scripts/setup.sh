#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine: system packages, the project's venv, and the
# PostgreSQL binaries of other majors. Every step checks first and does nothing when its work
# is already done, so a second `make test` reinstalls nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJORS=${PG_MAJORS:-"13 14 16 17 18"}
VENV=.venv

say() { printf 'setup: %s\n' "$*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Debian packages ----------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v age >/dev/null || missing+=(age)
command -v zstd >/dev/null || missing+=(zstd)
command -v npm >/dev/null || missing+=(npm)
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pg_verifybackup ] || missing+=(postgresql-client-15)
# The venv is built from Debian's interpreter: archive_command and restore_command run
# cloud-dump as the postgres user, who cannot reach an interpreter under a private home
# directory (pyenv's, for instance).
PYTHON=${CLOUD_DUMP_PYTHON:-/usr/bin/python3}
[ -x "$PYTHON" ] || missing+=(python3)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi
id postgres >/dev/null 2>&1 || { say "error: no 'postgres' OS user after installing postgresql-15"; exit 1; }

# --- the virtualenv -----------------------------------------------------------------------
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=$VENV/.cloud-dump-installed
if [ -x $VENV/bin/python ] && ! runuser -u postgres -- test -x "$(readlink -f $VENV/bin/python)"; then
    say "the interpreter of $VENV is out of the postgres user's reach: recreating it from $PYTHON"
    rm -rf $VENV
fi
if [ ! -x $VENV/bin/python ]; then
    say "creating $VENV"
    "$PYTHON" -m venv $VENV
fi
if [ ! -f $stamp ] || [ pyproject.toml -nt $stamp ]; then
    say "installing cloud-dump and its test and dev extras into $VENV"
    $VENV/bin/python -m pip install -q --upgrade pip
    # compat: a plain .pth path entry instead of setuptools' import-hook finder, which costs
    # every cloud-dump start ~10 ms (archive_command starts one per WAL segment).
    $VENV/bin/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
    touch $stamp
else
    say "$VENV up to date"
fi
# Byte-compile the project's own modules (quick when they are current). archive_command and
# restore_command run as postgres, which cannot write __pycache__ here: without this every
# call would compile every module it imports again, ~10-20 ms per WAL segment.
$VENV/bin/python -m compileall -q -j 0 coordinator storage workers tasks options >/dev/null

# --- the Compose specification's JSON schema -----------------------------------------------
# tests/test_deploy_files.py validates compose.yaml against it. The schema (compose-spec.json,
# Apache-2.0, from the compose-spec project) comes as the npm package dclint (MIT) ships it, in
# schemas/compose.schema.json: pinned, and checked against its SHA-256.
COMPOSE_SCHEMA=.cache/compose-spec/compose-spec.json
COMPOSE_SCHEMA_PACKAGE=dclint@3.1.0
COMPOSE_SCHEMA_SHA256=46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496
if echo "$COMPOSE_SCHEMA_SHA256  $COMPOSE_SCHEMA" | sha256sum --check --status 2>/dev/null; then
    say "Compose schema present"
else
    say "fetching the Compose schema from $COMPOSE_SCHEMA_PACKAGE"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent --ignore-scripts "$COMPOSE_SCHEMA_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/dclint-*.tgz -C "$tmp" package/schemas/compose.schema.json
    echo "$COMPOSE_SCHEMA_SHA256  $tmp/package/schemas/compose.schema.json" | sha256sum --check --quiet
    mkdir -p "$(dirname $COMPOSE_SCHEMA)"
    mv "$tmp/package/schemas/compose.schema.json" "$COMPOSE_SCHEMA"
    rm -rf "$tmp"
fi

# --- PostgreSQL binaries of other majors ----------------------------------------------------
# shellcheck disable=SC2086
$VENV/bin/python -m devrig.pgbin fetch $PG_MAJORS
