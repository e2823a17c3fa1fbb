#!/usr/bin/env bash
# Checks what packaging/build wrote into dist/: package contents, maintainer scripts, the units
# (systemd-analyze verify and security rating), the .deb installed and purged with dpkg on this
# machine, the .rpm inspected with rpm, lintian and rpmlint with no finding beyond the documented
# overrides (packaging/deb/lintian-overrides, packaging/rpm/rpmlintrc), and the static binary
# serving locks from an empty root.
#
#   bash packaging/build && bash tests/packages.sh
#
# Needs root (dpkg, chroot). Exits non-zero at the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
deb=dist/tcpnetlock_${version}-1_amd64.deb
rpm=dist/tcpnetlock-${version}-1.x86_64.rpm
fail() { echo "packages: FAIL: $*" >&2; exit 1; }
# A restart (or reload) of the socket unit in a maintainer script: the listening socket would close.
restarts_socket='(^|[[:space:]])(try-|condrestart|reload-or-)?(restart|reload)[[:space:]]+[^|;&]*tcpnetlock\.socket'
pass() { echo "packages: ok: $*"; }

# --- the static binary -------------------------------------------------------------------------
# What ships has cluster mode in (the etcd feature: etcd's JSON API over HTTP, TLS with rustls):
# at most 4 MiB. The server without it, the same build minus the feature, stays within the 2 MiB
# it always had: built here (not shipped), into the same target directory.
size=$(stat -c %s dist/tcpnetlock)
[ "$size" -le $((4 * 1024 * 1024)) ] || fail "binary is $size bytes, over 4 MiB"
file dist/tcpnetlock | grep -q "static" || fail "binary is not static: $(file dist/tcpnetlock)"
target_dir=$(cargo metadata --no-deps --locked --format-version 1 \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked --quiet --target x86_64-unknown-linux-musl
memory=$target_dir/x86_64-unknown-linux-musl/release/tcpnetlock
msize=$(stat -c %s "$memory")
[ "$msize" -le $((2 * 1024 * 1024)) ] || fail "the build without cluster mode is $msize bytes, over 2 MiB"
out=$("$memory" server --listen 127.0.0.1:0 --etcd http://127.0.0.1:1 2>&1 || true)
grep -q "this build has no cluster mode" <<<"$out" \
    || fail "the build without the etcd feature does not say it has no cluster mode: $out"
pass "static binary, $size bytes with cluster mode (budget 4 MiB), $msize without (budget 2 MiB)"

# An empty root: nothing but the binary (no libc, no /etc, no /dev, no /proc, no /dev/log).
root=$(mktemp -d)
trap 'kill "${srv:-0}" 2>/dev/null || true; rm -rf "$root"' EXIT
cp dist/tcpnetlock "$root/tcpnetlock"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
chroot "$root" /tcpnetlock server --listen "127.0.0.1:$port" 2>"$root.log" &
srv=$!
for _ in $(seq 100); do grep -q "listening on" "$root.log" 2>/dev/null && break; sleep 0.05; done
exec 3<>"/dev/tcp/127.0.0.1/$port"
echo 'lock,name:chroot' >&3
read -r reply <&3
[ "$reply" = ok ] || fail "empty chroot: lock got '$reply'; log: $(cat "$root.log")"
reply=$(echo 'lock,name:chroot' | nc -N 127.0.0.1 "$port" | head -n 1)
[ "$reply" = not-granted ] || fail "empty chroot: second lock got '$reply'"
exec 3<&-
kill "$srv"; wait "$srv" 2>/dev/null || true
grep -q "INFO" "$root.log" || fail "no log on stderr without /dev/log"
rm -f "$root.log"
pass "serves locks from an empty root, logging to stderr"

# Cluster mode from the empty root too (no /etc, no CA bundle, no resolver): a member of a
# one-node etcd on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
eport=$(free_port)
epeer=$(free_port)
edata=$(mktemp -d /dev/shm/tcpnetlock-packages-etcd.XXXXXX 2>/dev/null || mktemp -d)
etcd --data-dir "$edata" --listen-client-urls "http://127.0.0.1:$eport" \
    --advertise-client-urls "http://127.0.0.1:$eport" --listen-peer-urls "http://127.0.0.1:$epeer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$epeer" \
    --initial-cluster "default=http://127.0.0.1:$epeer" --log-level error >/dev/null 2>&1 &
etcd_pid=$!
trap 'kill "${srv:-0}" "${etcd_pid:-0}" 2>/dev/null || true; rm -rf "$root" "$edata"' EXIT
port=$(free_port)
chroot "$root" /tcpnetlock server --listen "127.0.0.1:$port" --etcd "http://127.0.0.1:$eport" \
    --etcd-name chroot 2>"$root.log" &
srv=$!
reply=
for _ in $(seq 200); do
    reply=$(echo '.ping,serving:1' | nc -N 127.0.0.1 "$port" 2>/dev/null | head -n 1 || true)
    [ "$reply" = pong ] && break
    sleep 0.1
done
[ "$reply" = pong ] || fail "empty chroot, cluster mode: not serving ('$reply'); log: $(cat "$root.log")"
exec 3<>"/dev/tcp/127.0.0.1/$port"
echo 'lock,name:chroot,fencing:1' >&3
read -r reply <&3
case "$reply" in ok,token:*) ;; *) fail "empty chroot, cluster mode: lock got '$reply'" ;; esac
exec 3<&-
kill "$srv" "$etcd_pid"; wait "$srv" "$etcd_pid" 2>/dev/null || true
rm -rf "$root.log" "$edata"
pass "serves locks in cluster mode (etcd on loopback) from an empty root"

# --- units ------------------------------------------------------------------------------------
score=$(systemd-analyze security --offline=yes systemd/tcpnetlock.service 2>&1 \
    | sed -n 's/.*Overall exposure level for tcpnetlock.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || fail "no security score"
python3 -c "import sys; sys.exit(0 if float('$score') <= 1.1 else 1)" \
    || fail "systemd-analyze security rates the service $score (> 1.1)"
pass "systemd-analyze security: $score"
# With cluster mode's drop-in, as an admin installs it: only what reaching etcd takes (the host's
# network 0.5, Internet sockets 0.3, a non-loopback allow list 0.1) on top of the unit's own.
units=$(mktemp -d)
cp systemd/tcpnetlock.service "$units/"
mkdir "$units/tcpnetlock.service.d"
cp systemd/tcpnetlock-cluster.conf "$units/tcpnetlock.service.d/cluster.conf"
rating=$(systemd-analyze security --offline=yes "$units/tcpnetlock.service" 2>&1)
cscore=$(sed -n 's/.*Overall exposure level for tcpnetlock.service: \([0-9.]*\).*/\1/p' <<<"$rating")
[ -n "$cscore" ] || fail "no security score with the cluster drop-in: $rating"
python3 -c "import sys; sys.exit(0 if round(float('$cscore') - float('$score'), 1) <= 0.9 else 1)" \
    || fail "the cluster drop-in takes the rating from $score to $cscore (more than +0.9)"
for line in "✗ PrivateNetwork=" "✗ RestrictAddressFamilies=~AF_(INET|INET6)" "✗ IPAddressDeny="; do
    grep -qF -- "$line" <<<"$rating" || fail "with the cluster drop-in: no '$line' in the rating"
done
grep -qF -- "✗ RestrictAddressFamilies=~AF_PACKET" <<<"$rating" && fail "the cluster drop-in allows AF_PACKET"
rm -rf "$units"
pass "systemd-analyze security with the cluster drop-in: $cscore"

# --- .deb -------------------------------------------------------------------------------------
contents=$(dpkg-deb -c "$deb" | awk '{printf "%s", $1; for (i = 6; i <= NF; i++) printf " %s", $i; print ""}')
for want in \
    "-rwxr-xr-x ./usr/bin/tcpnetlock" \
    "lrwxrwxrwx ./usr/bin/tcpnetlock_server -> tcpnetlock" \
    "lrwxrwxrwx ./usr/bin/tcpnetlock_client -> tcpnetlock" \
    "lrwxrwxrwx ./usr/bin/tcpnetlock_do -> tcpnetlock" \
    "-rw-r--r-- ./lib/systemd/system/tcpnetlock.socket" \
    "-rw-r--r-- ./lib/systemd/system/tcpnetlock.service" \
    "-rw-r--r-- ./usr/share/man/man1/tcpnetlock.1.gz" \
    "-rw-r--r-- ./usr/share/man/man1/tcpnetlock-server.1.gz" \
    "-rw-r--r-- ./usr/share/man/man1/tcpnetlock_server.1.gz" \
    "-rw-r--r-- ./usr/share/man/man1/tcpnetlock_client.1.gz" \
    "-rw-r--r-- ./usr/share/man/man1/tcpnetlock_do.1.gz" \
    "-rw-r--r-- ./usr/share/doc/tcpnetlock/changelog.Debian.gz" \
    "-rw-r--r-- ./usr/share/lintian/overrides/tcpnetlock" \
    "-rw-r--r-- ./usr/share/bash-completion/completions/tcpnetlock" \
    "-rw-r--r-- ./usr/share/zsh/vendor-completions/_tcpnetlock" \
    "-rw-r--r-- ./usr/share/fish/vendor_completions.d/tcpnetlock.fish" \
    "-rw-r--r-- ./usr/share/doc/tcpnetlock/README.md" \
    "-rw-r--r-- ./usr/share/doc/tcpnetlock/CLUSTER.md" \
    "-rw-r--r-- ./usr/share/doc/tcpnetlock/examples/tcpnetlock-cluster.conf" \
    "-rw-r--r-- ./usr/share/doc/tcpnetlock/copyright"; do
    grep -qxF -- "$want" <<<"$contents" || fail ".deb lacks: $want"
done
# Every name in /usr/bin has its own page (Debian policy 12.1), gzipped as the packages ship them.
for bin in $(awk '$2 ~ /^\.\/usr\/bin\/./ {sub(/^\.\/usr\/bin\//, "", $2); print $2}' <<<"$contents"); do
    grep -qxF -- "-rw-r--r-- ./usr/share/man/man1/$bin.1.gz" <<<"$contents" || fail ".deb: no man page for /usr/bin/$bin"
done
[ -z "$(grep -E '^[^d].* \./usr/share/man/.*[^z]$' <<<"$contents" || true)" ] || fail ".deb: a man page is not gzipped"
# Nothing to depend on (a static binary; deb-systemd-helper is in an essential package): no
# field at all rather than an empty one.
dpkg-deb -f "$deb" | grep -q '^Depends:' && fail ".deb has a Depends field: $(dpkg-deb -f "$deb" Depends)"
[ "$(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/share/doc/tcpnetlock/changelog.Debian.gz | gunzip)" \
    = "$(cat packaging/changelog)" ] || fail ".deb changelog differs from packaging/changelog"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/bin/tcpnetlock | cmp -s - dist/tcpnetlock \
    || fail ".deb's /usr/bin/tcpnetlock is not dist/tcpnetlock (the build with cluster mode)"
pass ".deb contents (a man page per command name, changelog, no empty Depends, the binary of dist/)"
scripts=$(mktemp -d)
dpkg-deb -e "$deb" "$scripts"
grep -q "deb-systemd-helper enable tcpnetlock.socket" "$scripts/postinst" || fail "postinst does not enable the socket"
grep -q "deb-systemd-invoke start tcpnetlock.socket" "$scripts/postinst" || fail "postinst does not start the socket"
grep -q "deb-systemd-invoke try-restart tcpnetlock.service" "$scripts/postinst" \
    || fail "postinst does not restart the service on upgrade (the hand-over)"
grep -nE "$restarts_socket" "$scripts"/* \
    && fail "a maintainer script restarts the socket (new clients would be refused meanwhile)"
grep -q "deb-systemd-invoke stop tcpnetlock.socket tcpnetlock.service" "$scripts/prerm" || fail "prerm does not stop"
grep -q "deb-systemd-helper purge tcpnetlock.socket" "$scripts/postrm" || fail "postrm does not purge"
grep -l "#DEBHELPER#" "$scripts"/* && fail "a maintainer script has an unexpanded #DEBHELPER#"
[ -s "$scripts/md5sums" ] || fail ".deb has no md5sums"
rm -rf "$scripts"
pass ".deb maintainer scripts"

dpkg -i "$deb" >/dev/null
[ "$(/usr/bin/tcpnetlock --version)" = "tcpnetlock $version" ] || fail "installed binary: $(/usr/bin/tcpnetlock --version)"
[ "$(readlink /usr/bin/tcpnetlock_do)" = tcpnetlock ] || fail "drop-in symlink missing"
[ -f /lib/systemd/system/tcpnetlock.socket ] || fail "socket unit not installed"
for name in tcpnetlock tcpnetlock-server tcpnetlock_server tcpnetlock_client tcpnetlock_do; do
    man -w "$name" >/dev/null || fail "man page $name not found by man"
done
out=$(dpkg --verify tcpnetlock 2>&1) || fail "dpkg --verify: $out"
[ -z "$out" ] || fail "dpkg --verify is not clean: $out"
[ -L /etc/systemd/system/sockets.target.wants/tcpnetlock.socket ] || fail "socket not enabled on install"
# verify as installed: ExecStart exists, and Documentation=man:tcpnetlock(1) resolves.
out=$(systemd-analyze verify tcpnetlock.socket tcpnetlock.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify is not clean: $out"
pass "systemd-analyze verify clean (installed units, man page checked)"
# The cluster drop-in, installed the documented way (in a scratch unit directory, not /etc).
units=$(mktemp -d)
install -D -m 0644 /usr/share/doc/tcpnetlock/examples/tcpnetlock-cluster.conf \
    "$units/tcpnetlock.service.d/cluster.conf"
out=$(SYSTEMD_UNIT_PATH="$units:" systemd-analyze verify tcpnetlock.service 2>&1) \
    || fail "systemd-analyze verify with the cluster drop-in: $out"
[ -z "$out" ] || fail "systemd-analyze verify with the cluster drop-in is not clean: $out"
rm -rf "$units"
pass "systemd-analyze verify clean with the cluster drop-in"
dpkg --purge tcpnetlock >/dev/null
left=$(ls -d /usr/bin/tcpnetlock* /lib/systemd/system/tcpnetlock* /usr/share/man/man1/tcpnetlock* \
    /usr/share/doc/tcpnetlock /etc/systemd/system/tcpnetlock* /etc/systemd/system/*/tcpnetlock* \
    /var/lib/systemd/deb-systemd-helper-*/*tcpnetlock* /var/lib/systemd/deb-systemd-helper-*/*/*tcpnetlock* \
    2>/dev/null || true)
[ -z "$left" ] || fail "left behind after purge: $left"
pass ".deb installs (binary, drop-in names, units, man pages, socket enabled, dpkg --verify) and purges clean"

# --- .rpm -------------------------------------------------------------------------------------
files=$(rpm -qlp "$rpm")
for want in /usr/bin/tcpnetlock /usr/bin/tcpnetlock_server /usr/bin/tcpnetlock_client \
    /usr/bin/tcpnetlock_do /usr/lib/systemd/system/tcpnetlock.socket \
    /usr/lib/systemd/system/tcpnetlock.service /usr/share/bash-completion/completions/tcpnetlock \
    /usr/share/zsh/site-functions/_tcpnetlock /usr/share/fish/vendor_completions.d/tcpnetlock.fish \
    /usr/share/man/man1/tcpnetlock-server.1.gz /usr/share/doc/tcpnetlock/README.md \
    /usr/share/doc/tcpnetlock/CLUSTER.md /usr/share/doc/tcpnetlock/examples/tcpnetlock-cluster.conf \
    /usr/share/licenses/tcpnetlock/LICENSE; do
    grep -qxF "$want" <<<"$files" || fail ".rpm lacks $want"
done
# rpmlint 2.4 cannot check this (see packaging/rpm/rpmlintrc): every name in /usr/bin has its page.
for bin in $(sed -n 's|^/usr/bin/||p' <<<"$files"); do
    grep -qxF "/usr/share/man/man1/$bin.1.gz" <<<"$files" || fail ".rpm: no man page for /usr/bin/$bin"
done
[ -z "$(grep '^/usr/share/man/.*[^z]$' <<<"$files" || true)" ] || fail ".rpm: a man page is not gzipped"
[ "$(rpm -qp --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}' "$rpm")" = "tcpnetlock-$version-1.x86_64" ] \
    || fail ".rpm name/version"
maintainer=$(sed -n 's/^maintainer = "\(.*\)"/\1/p' Cargo.toml)
[ "$(rpm -qp --qf '%{PACKAGER}' "$rpm")" = "$maintainer" ] || fail ".rpm Packager is not Cargo.toml's maintainer"
[ "$(rpm -qp --qf '%{GROUP}' "$rpm")" = "System Environment/Daemons" ] || fail ".rpm Group"
rpm -qp --changelog "$rpm" | head -n 1 | grep -q " - $version-1\$" \
    || fail ".rpm %changelog does not start with $version-1: $(rpm -qp --changelog "$rpm" | head -n 1)"
rscripts=$(rpm -qp --scripts "$rpm")
grep -q "systemctl --no-reload preset tcpnetlock.socket" <<<"$rscripts" || fail ".rpm %post does not preset the socket"
grep -q "disable --now tcpnetlock.socket tcpnetlock.service" <<<"$rscripts" || fail ".rpm %preun does not stop"
grep -q "try-restart tcpnetlock.service" <<<"$rscripts" \
    || fail ".rpm %postun does not restart the service on upgrade (the hand-over)"
grep -nE "$restarts_socket" <<<"$rscripts" \
    && fail ".rpm: a scriptlet restarts the socket (new clients would be refused meanwhile)"
rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$rpm" | grep -qx -- "-rwxr-xr-x /usr/bin/tcpnetlock" \
    || fail ".rpm binary mode"
[ "$(rpm -qp --qf '[%{FILENAMES} -> %{FILELINKTOS}\n]' "$rpm" | grep -c ' -> tcpnetlock$')" = 3 ] \
    || fail ".rpm: the three drop-in names are not symlinks to tcpnetlock"
pass ".rpm contents, tags, changelog and scriptlets"

# --- linters ----------------------------------------------------------------------------------
# Any finding fails, and so does an override or filter that no longer matches anything (lintian
# reports it as info, rpmlint as an error), so none outlives its reason.
echo "packages: $(lintian --version), rpmlint $(rpmlint --version)"
out=$(lintian --fail-on error,warning --display-info "$deb" 2>&1) || fail "lintian: $out"
bad=$(grep -E '^[EW]: |unused-override|mismatched-override' <<<"$out" || true)
[ -z "$bad" ] || fail "lintian: $bad"
pass "lintian: no error or warning, $(grep -c '^tcpnetlock: ' packaging/deb/lintian-overrides) documented overrides (packaging/deb/lintian-overrides)"
out=$(rpmlint -c packaging/rpm/rpmlint.toml -r packaging/rpm/rpmlintrc "$rpm" 2>&1) \
    || fail "rpmlint: $out"
grep -q " 0 errors, 0 warnings" <<<"$out" || fail "rpmlint: $out"
pass "rpmlint: no error or warning, $(grep -c '^addFilter' packaging/rpm/rpmlintrc) documented filters (packaging/rpm/rpmlintrc)"
echo "packages: all checks passed"
