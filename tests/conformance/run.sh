#!/usr/bin/env bash
# Runs the original tcpnetlock 0.1.8 test suite (Python client, tcpnetlock_client/tcpnetlock_do
# CLIs, protocol) against our Rust server binary.
#
#   TCPNETLOCK_BIN=path/to/tcpnetlock bash tests/conformance/run.sh [--dropin] [extra pytest args]
#
# With --dropin, only 0.1.8's CLI tests run, and the programs they start (`python -m
# tcpnetlock.cli.tnl_do`, `...tnl_client`) are replaced by our binary under the original names
# (symlinks tcpnetlock_do, tcpnetlock_client): 0.1.8's expectations of its own CLIs, checked
# against ours.
#
# With TCPNETLOCK_CONFORMANCE_ETCD=URL[,URL...] (etcd client URLs) every server is a cluster member
# on that etcd (`--etcd`, a lock space of its own): the same suite, in cluster mode.
#
# TCPNETLOCK_BIN defaults to target/debug/tcpnetlock. The 0.1.8 code is never committed: the sdist
# is downloaded into a scratch dir ($CARGO_TARGET_DIR or target/, then conformance/) together with
# a venv; both are reused by later runs. Exits with pytest's status.
set -euo pipefail

dropin=
if [ "${1:-}" = --dropin ]; then
    dropin=1
    shift
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
bin=$(realpath -m "${TCPNETLOCK_BIN:-target/debug/tcpnetlock}")
[ -x "$bin" ] || { echo "conformance: no server binary at $bin (cargo build first)" >&2; exit 2; }
work=$(realpath -m "${CARGO_TARGET_DIR:-target}/conformance")
sdist_sha256=7a7e83eba4eb43fe5ef5690e2f3251ecf4712be1d04d05df999401c2c8243d2a
src=$work/tcpnetlock-0.1.8
mkdir -p "$work"

# tcpnetlock_do's tests run `vmstat` under the lock.
if ! command -v vmstat >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq procps >/dev/null
    else
        echo "conformance: vmstat is missing; install the procps package" >&2; exit 2
    fi
fi

# The marker is written last, so an interrupted install is redone rather than half reused.
if [ ! -e "$work/venv/.installed" ]; then
    rm -rf "$work/venv"
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q tcpnetlock==0.1.8 pytest==8.4.2
    touch "$work/venv/.installed"
fi

if [ ! -d "$src/tests" ]; then
    rm -rf "$work/dl" "$src"
    "$work/venv/bin/pip" download -q --no-binary :all: --no-deps -d "$work/dl" tcpnetlock==0.1.8
    echo "$sdist_sha256  $work/dl/tcpnetlock-0.1.8.tar.gz" | sha256sum -c --quiet
    tar -xzf "$work/dl/tcpnetlock-0.1.8.tar.gz" -C "$work"
fi
# Copied on every run so edits to our conftest take effect.
cp tests/conformance/conftest.py "$src/conftest.py"

logs=$work/logs${dropin:+-dropin}
rm -rf "$logs" && mkdir -p "$logs"
export TCPNETLOCK_BIN=$bin TCPNETLOCK_LOG_DIR=$logs
# The CLI tests spawn `python -m tcpnetlock.cli...`: that must be the venv's python.
export PATH=$work/venv/bin:$PATH
# The only tests left out: they check the Python server itself, not the wire.
skip=(
    # reads the Python server's in-process lock table (lock_server.server._context._locks)
    --deselect tests/test_functional.py::TestBackgroundThread
    # runs the Python server's own CLI (tcpnetlock_server); the --dropin pass runs ours instead
    --deselect tests/test_cli_tnl_server.py
)
selection=(tests)
if [ -n "$dropin" ]; then
    # conftest.py swaps `python -m tcpnetlock.cli.X` for these when TCPNETLOCK_DROPIN_DIR is set.
    rm -rf "$work/dropin" && mkdir -p "$work/dropin"
    for name in tcpnetlock_do tcpnetlock_client tcpnetlock_server; do
        ln -s "$bin" "$work/dropin/$name"
    done
    export TCPNETLOCK_DROPIN_DIR=$work/dropin
    skip=()
    if [ "$(id -u)" = 0 ]; then
        # expects binding port 20 to fail with [Errno 13]; root may bind it (and would serve)
        skip+=(--deselect tests/test_cli_tnl_server.py::TestServerCli::test_report_bind_to_privileged_port)
    fi
    selection=(tests/test_cli_tnl_do.py tests/test_cli_tnl_client.py tests/test_cli_tnl_server.py)
fi
cd "$src"
status=0
python -m pytest -p no:cacheprovider -rfE "${skip[@]}" "$@" "${selection[@]}" || status=$?
if [ "$status" != 0 ]; then
    echo "conformance: FAILED (pytest status $status); server logs in $logs" >&2
fi
exit "$status"
