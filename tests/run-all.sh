#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests drive, then checks formatting,
# lints, and runs every unit and integration test (Python 0.1.8 conformance included).
#
#   bash tests/run-all.sh
#
# System packages are installed with apt-get when missing (root needed for that step only).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests start real clients and tools: every nc variant, socat, busybox, bash's /dev/tcp,
# systemd-socket-activate, ss, ip (network namespaces: tests/faults_netns.rs), vmstat (0.1.8's CLI
# tests), strace (the token reservation's fsyncs: tests/tokens.rs), python3 with venv (0.1.8
# itself), promtool, a real Prometheus and node_exporter, and curl (the metrics: tests/metrics.rs,
# tests/prometheus.rs); the package checks need rpm (rpmbuild too), file, man, lintian and
# rpmlint; the end-to-end test debootstrap and nspawn; the etcd tests (tests/etcd_client.rs,
# tests/cluster.rs, tests/cluster_faults.rs) a real etcd, etcdctl, and openssl for TLS
# certificates.
packages=(netcat-openbsd netcat-traditional ncat busybox socat systemd iproute2 procps strace
    prometheus prometheus-node-exporter curl rpm file man-db lintian rpmlint debootstrap
    systemd-container etcd-server etcd-client openssl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "run-all: missing packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "run-all: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c 'import venv' || { echo "run-all: python3 with the venv module is needed" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true

set -x
cargo fmt --check
# The plain build (no cluster mode) must stay clean too; the tests run with cluster mode
# (--features etcd), so the etcd client's and the cluster's tests (tests/etcd_client.rs,
# tests/cluster.rs) run with the rest.
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features etcd -- -D warnings
cargo test --features etcd
# The protocol suites again, every server a cluster member on a 3-member etcd (tests/common/mod.rs):
# 0.1.8's bytes, v2's requests and 0.1.8's own pytest suite through `tcpnetlock server --etcd`.
TCPNETLOCK_TEST_ETCD=1 cargo test --features etcd --test protocol_v1 --test protocol_v2 --test conformance

# Release artifacts and what runs them: the static binary in an empty root, the .deb and .rpm,
# the units (verify, security rating), then the .deb under a real systemd as PID 1.
if [ "$(id -u)" = 0 ]; then
    bash packaging/build
    bash tests/packages.sh
    bash tests/systemd-e2e/run.sh
else
    echo "run-all: not root: skipping the package checks and the systemd end-to-end test" >&2
fi
