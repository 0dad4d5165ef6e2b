#!/usr/bin/env bash
# One entry point for a fresh Debian machine, run as root:
#   bash scripts/dev.sh demo   set up everything, then run `gateway demo`
#   bash scripts/dev.sh test   set up everything, then run the whole test suite
# Idempotent: every step checks before it installs. A step that fails stops the script with
# a message naming it (exit status non-zero); run it again once the cause is gone.
set -euo pipefail
step="starting"
trap 'echo "dev.sh: failed while ${step} (exit $?); fix the cause and run it again" >&2' ERR
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${GATEWAY_VENV:-$ROOT/.venv}"

need_apt=()
for pair in softhsm2-util:softhsm2 xmlsec1:xmlsec1 openssl:openssl pkcs11-tool:opensc wrk:wrk strace:strace; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair##*:}")
done
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then need_apt+=(softhsm2); fi
# A bare Debian has python3 without venv/ensurepip (package python3-venv).
if ! command -v "${PYTHON:-python3}" >/dev/null 2>&1; then need_apt+=(python3 python3-venv)
elif ! "${PYTHON:-python3}" -c "import venv, ensurepip" >/dev/null 2>&1; then need_apt+=(python3-venv); fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev.sh: missing Debian packages: ${need_apt[*]}; run as root, or install them first" >&2
        exit 1
    fi
    step="installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
# A venv whose pip does not run is made again: `python3 -m venv` interrupted (Ctrl-C) leaves
# bin/python without pip, and every later run failed on "bin/pip: No such file or directory".
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    # --clear empties the directory: only a venv (or nothing) is ever cleared.
    if [ -e "$VENV" ] && [ ! -e "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV")" ]; then
        echo "dev.sh: $VENV exists and is not a virtual environment; move it away or set GATEWAY_VENV" >&2
        exit 1
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "dev.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())');" \
             "the gateway needs 3.11 or later: set PYTHON to one" >&2
        exit 1
    fi
    step="creating the virtual environment $VENV"
    "$PY" -m venv --clear "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    step="installing the package and its dependencies into $VENV (pip)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
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
        if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
            echo "dev.sh: no PostgreSQL server answers on 127.0.0.1:5432: the PostgreSQL tests will be" \
                 "skipped (with CI set, they fail)" >&2
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
