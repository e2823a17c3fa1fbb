#!/usr/bin/env bash
# End to end under a real systemd as PID 1: debootstrap a minimal Debian bookworm, install the
# .deb from dist/ into it, boot it with systemd-nspawn, and let a test unit inside (inside.sh)
# check socket activation, readiness, the sandbox, the journal, restarts and IPAddressDeny. The
# unit reports with `systemctl exit N`, which becomes nspawn's exit status.
#
#   bash packaging/build && bash tests/systemd-e2e/run.sh
#
# Needs root. The rootfs is cached in target/e2e-rootfs (about 290 MB, 40 s to make); set
# E2E_FRESH=1 to rebuild it. The container has only loopback (--private-network).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
deb=$repo/dist/tcpnetlock_${version}-1_amd64.deb
[ -f "$deb" ] || { echo "e2e: $deb missing: run bash packaging/build first" >&2; exit 2; }
base=${CARGO_TARGET_DIR:-$repo/target}/e2e-rootfs
root=${CARGO_TARGET_DIR:-$repo/target}/e2e-run

for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >/dev/null
        break
    }
done

if [ -n "${E2E_FRESH:-}" ] || [ ! -e "$base/.complete" ]; then
    rm -rf "$base"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    start=$(date +%s)
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,netcat-openbsd \
        bookworm "$base" "${mirror:-http://deb.debian.org/debian}" >"$base.log" 2>&1 \
        || { tail -20 "$base.log"; exit 1; }
    touch "$base/.complete"
    echo "e2e: debootstrap took $(( $(date +%s) - start )) s"
fi

# A fresh copy per run, so every run starts from a clean system.
rm -rf "$root"
cp -a "$base" "$root"
cp "$deb" "$root/tmp/tcpnetlock.deb"
chroot "$root" dpkg -i /tmp/tcpnetlock.deb >/dev/null
install -m 755 "$here/inside.sh" "$root/usr/local/sbin/tcpnetlock-e2e"
cat >"$root/etc/systemd/system/tcpnetlock-e2e.service" <<'UNIT'
[Unit]
Description=tcpnetlock end-to-end checks
After=multi-user.target tcpnetlock.socket
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/tcpnetlock-e2e
StandardOutput=journal+console
StandardError=journal+console
UNIT
# No login prompts: a getty started while the socket is set up was seen holding a copy of the
# listening socket (systemd 252 in nspawn), which made restarting the socket fail to bind.
for getty in console-getty.service getty@.service serial-getty@.service container-getty@.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$getty"
done
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../tcpnetlock-e2e.service "$root/etc/systemd/system/multi-user.target.wants/"

# nspawn from cgroups of its own (there is no systemd on the host to make a scope).
cg=tcpnetlock-e2e-$$
for h in systemd unified; do mkdir -p "/sys/fs/cgroup/$h/$cg"; done
cleanup() {
    for h in systemd unified; do
        find "/sys/fs/cgroup/$h/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    rm -rf /run/systemd/nspawn
}
trap cleanup EXIT
start=$(date +%s)
status=0
timeout 300 sh -c "for h in systemd unified; do echo \$\$ > /sys/fs/cgroup/\$h/$cg/cgroup.procs; done
    exec systemd-nspawn -q -D '$root' -b --register=no --keep-unit --console=read-only \
        --private-network --system-call-filter=bpf -M tcpnetlock-e2e" >"$root.boot.log" 2>&1 \
    || status=$?
echo "e2e: boot, checks and power-off took $(( $(date +%s) - start )) s, status $status"
grep -aE '^(PASS|FAIL|INFO)' "$root/var/log/tcpnetlock-e2e.txt" 2>/dev/null \
    || { echo "e2e: no result; console:"; tail -40 "$root.boot.log"; }
exit "$status"
