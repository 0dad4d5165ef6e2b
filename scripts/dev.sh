#!/usr/bin/env bash
# One entry point for a fresh Debian machine, run as root:
#   bash scripts/dev.sh demo   set up everything, then run `gateway demo`
#   bash scripts/dev.sh test   set up everything, then run the whole test suite
# Idempotent: every step checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${GATEWAY_VENV:-$ROOT/.venv}"

need_apt=()
for pair in softhsm2-util:softhsm2 xmlsec1:xmlsec1 openssl:openssl pkcs11-tool:opensc wrk:wrk; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair##*:}")
done
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then need_apt+=(softhsm2); fi
# A bare Debian has python3 without venv/ensurepip (package python3-venv).
if ! command -v "${PYTHON:-python3}" >/dev/null 2>&1; then need_apt+=(python3 python3-venv)
elif ! "${PYTHON:-python3}" -c "import venv, ensurepip" >/dev/null 2>&1; then need_apt+=(python3-venv); fi
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e ".[test,bench]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"

case "${1:-}" in
    demo)
        shift
        exec gateway demo "$@"
        ;;
    test)
        shift
        # PostgreSQL-backed tests need the local server; start it if it is down.
        if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
            if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
                pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
            fi
        fi
        exec python -m pytest -q -p no:cacheprovider "$@"
        ;;
    setup)
        echo "environment ready: $VENV"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test|setup" >&2
        exit 2
        ;;
esac
