#!/usr/bin/env bash
# End to end under a real systemd as PID 1: debootstrap a minimal Debian bookworm, install the
# .deb from dist/ into it, boot it with systemd-nspawn, and let a test unit inside (inside.sh)
# check socket activation, readiness, the sandbox, the journal, the hand-over on restart and
# reload (with 1,000 holders, the pause measured), a state refused, stop, IPAddressDeny, then a
# package upgrade to a copy of the .deb with a bumped version (the lock held across it) and the
# removal. The unit reports with `systemctl exit N`, which becomes nspawn's exit status.
#
#   bash packaging/build && bash tests/systemd-e2e/run.sh
#
# Needs root. The rootfs is cached in target/e2e-rootfs (about 290 MB, 40 s to make); set
# E2E_FRESH=1 to rebuild it. The container has only loopback (--private-network).
#
# debootstrap fetches from the Debian mirror this machine's apt uses (see debian_mirror), or from
# E2E_MIRROR if set; there is no built-in fallback, since a mirror chosen here may be unreachable
# or unwanted where this runs. `run.sh --print-mirror` prints the choice and exits.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

# Every enabled `deb` source of apt's configuration under $1, one "SUITE URI" line per suite and
# URI: one-line sources.list entries and deb822 *.sources stanzas alike.
apt_sources() {
    local files=() f
    for f in "$1/sources.list" "$1"/sources.list.d/*.list "$1"/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk '
        function flush(  i, j) {
            if (isdeb && enabled != "no")
                for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print suites[j], uris[i]
            isdeb = 0; enabled = ""; nu = 0; ns = 0; key = ""
        }
        function field(k, v,  n, a, i) {
            n = split(v, a)
            for (i = 1; i <= n; i++) {
                if (k == "types" && a[i] == "deb") isdeb = 1
                else if (k == "uris") uris[++nu] = a[i]
                else if (k == "suites") suites[++ns] = a[i]
                else if (k == "enabled") enabled = tolower(a[i])
            }
        }
        FNR == 1 { flush(); deb822 = FILENAME ~ /\.sources$/ }
        /^[ \t]*#/ { next }
        deb822 && /^[ \t]*$/ { flush(); next }
        deb822 && /^[ \t]/ { field(key, $0); next }
        deb822 && index($0, ":") {
            key = tolower(substr($0, 1, index($0, ":") - 1))
            field(key, substr($0, index($0, ":") + 1))
            next
        }
        !deb822 && $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if (i + 1 <= NF) print $(i + 1), $i
        }
        END { flush() }
    ' "${files[@]}"
}

# The mirror to debootstrap bookworm from: the machine's own source for bookworm, else its
# first source that is a Debian archive (a URI ending in /debian). Fails, saying where it looked.
debian_mirror() {
    if [ -n "${E2E_MIRROR:-}" ]; then
        echo "$E2E_MIRROR"
        return
    fi
    local etc=${E2E_APT_ETC:-/etc/apt} sources mirror
    sources=$(apt_sources "$etc")
    mirror=$(awk '$1 == "bookworm" { print $2; exit }' <<<"$sources")
    [ -n "$mirror" ] || mirror=$(awk '$2 ~ /\/debian\/?$/ { print $2; exit }' <<<"$sources")
    if [ -z "$mirror" ]; then
        echo "e2e: no Debian mirror in this machine's apt configuration: no deb source for" \
            "bookworm nor one ending in /debian in $etc/sources.list," \
            "$etc/sources.list.d/*.list or $etc/sources.list.d/*.sources; add one there, or" \
            "set E2E_MIRROR=URL" >&2
        return 2
    fi
    echo "$mirror"
}

if [ "${1:-}" = --print-mirror ]; then
    debian_mirror
    exit
fi
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
    mirror=$(debian_mirror) || exit 2
    rm -rf "$base"
    start=$(date +%s)
    echo "e2e: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,netcat-openbsd \
        bookworm "$base" "$mirror" >"$base.log" 2>&1 \
        || { tail -20 "$base.log"; exit 1; }
    touch "$base/.complete"
    echo "e2e: debootstrap took $(( $(date +%s) - start )) s"
fi

# A fresh copy per run, so every run starts from a clean system.
rm -rf "$root"
cp -a "$base" "$root"
cp "$deb" "$root/tmp/tcpnetlock.deb"
chroot "$root" dpkg -i /tmp/tcpnetlock.deb >/dev/null
# The upgrade: the same package with its Debian revision bumped, a changelog entry for it, and
# a line appended to the binary, so that the running file can be told from the one it replaced.
up=$root.upgrade
rm -rf "$up"
dpkg-deb -R "$deb" "$up"
old_version=$(sed -n 's/^Version: //p' "$up/DEBIAN/control")
new_version=${old_version%-*}-$(( ${old_version##*-} + 1 ))
sed -i "s/^Version: .*/Version: $new_version/" "$up/DEBIAN/control"
printf '\ntcpnetlock e2e upgrade %s\n' "$new_version" >>"$up/usr/bin/tcpnetlock"
changelog=$up/usr/share/doc/tcpnetlock/changelog.Debian.gz
{
    printf 'tcpnetlock (%s) unstable; urgency=medium\n\n  * End-to-end test: the upgrade.\n\n' "$new_version"
    printf ' -- tcpnetlock e2e <e2e@localhost>  %s\n\n' "$(date -R)"
    gunzip -c "$changelog"
} | gzip -9n >"$changelog.new"
mv "$changelog.new" "$changelog"
(cd "$up" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$up/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz -b "$up" "$root/root/tcpnetlock-upgrade.deb" >/dev/null
rm -rf "$up"
install -m 755 "$here/inside.sh" "$root/usr/local/sbin/tcpnetlock-e2e"
cat >"$root/etc/systemd/system/tcpnetlock-e2e.service" <<'UNIT'
[Unit]
Description=tcpnetlock end-to-end checks
After=multi-user.target tcpnetlock.socket
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/tcpnetlock-e2e
TimeoutStartSec=600
LimitNOFILE=8192
StandardOutput=journal+console
StandardError=journal+console
UNIT
# The checks restart the service more often than systemd's default start limit allows (5 starts
# in 10 s): past it the unit fails, which would close the connections the test holds.
mkdir -p "$root/etc/systemd/system/tcpnetlock.service.d"
printf '[Unit]\nStartLimitIntervalSec=0\n' >"$root/etc/systemd/system/tcpnetlock.service.d/e2e.conf"
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
timeout 600 sh -c "for h in systemd unified; do echo \$\$ > /sys/fs/cgroup/\$h/$cg/cgroup.procs; done
    exec systemd-nspawn -q -D '$root' -b --register=no --keep-unit --console=read-only \
        --private-network --system-call-filter=bpf -M tcpnetlock-e2e" >"$root.boot.log" 2>&1 \
    || status=$?
echo "e2e: boot, checks and power-off took $(( $(date +%s) - start )) s, status $status"
grep -aE '^(PASS|FAIL|INFO)' "$root/var/log/tcpnetlock-e2e.txt" 2>/dev/null \
    || { echo "e2e: no result; console:"; tail -40 "$root.boot.log"; }
exit "$status"
