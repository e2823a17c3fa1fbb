#!/bin/bash
# Runs inside the booted container (see run.sh), as a oneshot unit during boot.
exec > >(tee /var/log/tcpnetlock-e2e.txt) 2>&1
failed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=1; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
prop() { systemctl show -P "$1" "$2"; }
svc() { prop "$1" tcpnetlock.service; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# The first line a new client gets for request $1.
ask() { echo "$1" | nc -N -w 5 127.0.0.1 7654 | head -n 1; }
stat() { ask .stats | grep -o "\"$1\": [0-9]*" | grep -o '[0-9]*$'; }
# Waits until the server counts $1 waiters.
waiting() { for _ in $(seq 200); do [ "$(stat waiting)" = "$1" ] && return; sleep 0.05; done; }
# What the client on fd $1 gets within $2 s: its line, EOF, or SILENT (open, nothing came).
next() {
    local r rc; read -r -t "$2" r <&"$1"; rc=$?
    if [ $rc -gt 128 ]; then echo SILENT; elif [ $rc != 0 ]; then echo EOF; else echo "$r"; fi
}
# The service's log lines since the cursor of `mark`.
mark() { cursor=$(journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'); }
since_mark() { journalctl -q -u tcpnetlock.service -o cat --after-cursor="$cursor"; }
token() { echo "${1#ok,token:}"; }

echo "INFO: pid1=$(cat /proc/1/comm) systemd=$(systemctl --version | head -n 1), $(nproc) CPUs"
ulimit -n 8192

check "socket enabled by the package" [ "$(systemctl is-enabled tcpnetlock.socket)" = enabled ]
check "socket listening" [ "$(systemctl is-active tcpnetlock.socket)" = active ]
check "service inactive before the first connection" [ "$(systemctl is-active tcpnetlock.service)" = inactive ]

# The holder keeps its connection on fd 7 (bash's /dev/tcp). Never open one in $(...): the
# subshell's descriptor closes with it.
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:e2e,fencing:1" >&7
read -r -t 10 reply <&7
check "lock granted through the activated socket (got '$reply')" [ "${reply%%:*}" = ok,token ]
first_token=$(token "$reply")
other=$(ask "lock,name:e2e")
check "second client refused (got '$other')" [ "$other" = not-granted ]
check "service active once serving" [ "$(systemctl is-active tcpnetlock.service)" = active ]
check "Type=notify: READY=1 and STATUS= received ($(svc StatusText))" \
    grep -q "locks held" <<<"$(svc StatusText)"
check "watchdog armed" [ "$(svc WatchdogUSec)" = 30s ]
check "fd store for the hand-over ($(svc FileDescriptorStoreMax))" [ "$(svc FileDescriptorStoreMax)" = 4 ]

pid=$(svc MainPID)
uid=$(awk '/^Uid:/ {print $2}' /proc/"$pid"/status)
check "runs as a dynamic user (uid $uid)" [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ]
check "under a seccomp filter" grep -q '^Seccomp:[[:space:]]*2' /proc/"$pid"/status
check "no new privileges" grep -q '^NoNewPrivs:[[:space:]]*1' /proc/"$pid"/status
check "its log is in the journal" \
    grep -q "serving 127.0.0.1:7654 (socket passed by systemd)" <<<"$(journalctl -u tcpnetlock.service -o cat)"
check "the keepalive of the socket unit is in force" \
    grep -q "dead peers dropped within 40s" <<<"$(journalctl -u tcpnetlock.service -o cat)"

# --- systemctl restart: the hand-over through the fd store ---------------------------------------
# A waiter on fd 8, queued behind the holder; the holder has half a request in the server.
exec 8<>/dev/tcp/127.0.0.1/7654
echo "lock,name:e2e,fencing:1,wait:120" >&8
waiting 1
printf 'rel' >&7
socket_since=$(prop ActiveEnterTimestampMonotonic tcpnetlock.socket)
mark
s=$(date +%s%N)
systemctl restart tcpnetlock.service
echo "INFO: systemctl restart with a holder and a waiter took $(ms_since "$s") ms"
newpid=$(svc MainPID)
check "restart: a new process ($pid -> $newpid)" [ "$newpid" != "$pid" ] && [ "$newpid" != 0 ]
since_mark | grep -E "handed over|took over" | sed 's/^/INFO:   /'
check "restart: the new process took the holder and the waiter over" \
    grep -q "took over 2 connections (1 holders, 1 waiters" <<<"$(since_mark)"
check "restart: nothing left in the fd store ($(svc NFileDescriptorStore))" [ "$(svc NFileDescriptorStore)" = 0 ]
r=$(next 7 0.3)
check "restart: the holder's connection is open and nothing came (got $r)" [ "$r" = SILENT ]
other=$(ask "lock,name:e2e")
check "restart: the lock is still held (a new client got '$other')" [ "$other" = not-granted ]
printf 'ease\n' >&7
r=$(next 7 5)
check "restart: the holder's half-sent 'release' completes on the same connection (got '$r')" [ "$r" = released ]
r=$(next 8 5)
check "restart: the waiter is granted in its turn, on the same connection (got '$r')" [ "${r%%:*}" = ok,token ]
waiter_token=$(token "$r")
check "restart: tokens keep growing ($first_token -> $waiter_token)" [ "$waiter_token" -gt "$first_token" ]
check "restart: the socket was never restarted" \
    [ "$(prop ActiveEnterTimestampMonotonic tcpnetlock.socket)" = "$socket_since" ]
exec 7<&- 8<&-

# --- systemctl reload: re-exec, same process ------------------------------------------------------
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:reloaded" >&7
read -r -t 10 reply <&7
pid=$(svc MainPID)
mark
s=$(date +%s%N)
systemctl reload tcpnetlock.service
echo "INFO: systemctl reload with a holder took $(ms_since "$s") ms"
for _ in $(seq 100); do grep -q "took over" <<<"$(since_mark)" && break; sleep 0.05; done
since_mark | grep -E "re-executing|took over" | sed 's/^/INFO:   /'
check "reload: the same process re-executed ($pid -> $(svc MainPID)), unit $(svc ActiveState)" \
    [ "$(svc MainPID)" = "$pid" ] && [ "$(svc ActiveState)" = active ] \
    && grep -q "took over 1 connections (1 holders" <<<"$(since_mark)"
echo ".keepalive" >&7
r=$(next 7 5)
check "reload: the holder is answered on the same connection (got '$r')" [ "$r" = alive ]
other=$(ask "lock,name:reloaded")
check "reload: the lock is still held (a new client got '$other')" [ "$other" = not-granted ]
exec 7<&-

# --- a state the new process cannot read: today's restart -----------------------------------------
mkdir -p /etc/systemd/system/tcpnetlock.service.d
printf '[Service]\nEnvironment=TCPNETLOCK_TEST_HANDOVER_VERSION=999\n' \
    >/etc/systemd/system/tcpnetlock.service.d/version.conf
systemctl daemon-reload
# This restart hands over as usual (the running process has no such variable); the next writes
# version 999, which no build reads.
systemctl restart tcpnetlock.service
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:refused" >&7
read -r -t 10 reply <&7
mark
systemctl restart tcpnetlock.service
r=$(next 7 5)
check "refused state: the holder is told by the close, as on a restart without hand-over (got $r)" [ "$r" = EOF ]
check "refused state: the new process says why" \
    grep -q "refusing what the previous process handed over: the state's format is version 999" <<<"$(since_mark)"
check "refused state: nothing left in the fd store ($(svc NFileDescriptorStore))" [ "$(svc NFileDescriptorStore)" = 0 ]
again=$(ask "lock,name:refused")
check "refused state: the server serves again (got '$again')" [ "$again" = ok ]
exec 7<&-
rm -r /etc/systemd/system/tcpnetlock.service.d/version.conf
systemctl daemon-reload
systemctl restart tcpnetlock.service

# --- systemctl stop closes every connection -------------------------------------------------------
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:stopped" >&7
read -r -t 10 reply <&7
s=$(date +%s%N)
systemctl stop tcpnetlock.service
r=$(next 7 5)
check "stop: the holder's connection ends, its lock with it (got $r, stop took $(ms_since "$s") ms)" [ "$r" = EOF ]
exec 7<&-
check "stop: nothing left in the fd store ($(svc NFileDescriptorStore))" [ "$(svc NFileDescriptorStore)" = 0 ]
again=$(ask "lock,name:stopped")
check "after a stop the socket starts the server again (got '$again')" [ "$again" = ok ]
check "socket still active after the stop" [ "$(systemctl is-active tcpnetlock.socket)" = active ]

# --- the pause with 1,000 holders: the wait of lock requests on fresh connections -----------------
holders=${E2E_HOLDERS:-1000}
fds=()
for i in $(seq "$holders"); do
    exec {fd}<>/dev/tcp/127.0.0.1/7654
    echo "lock,name:h$i" >&"$fd"
    fds+=("$fd")
done
granted=0
for fd in "${fds[@]}"; do [ "$(next "$fd" 10)" = ok ] && granted=$((granted + 1)); done
check "$holders holders granted" [ "$granted" = "$holders" ]
# Prober $1: a lock request on a fresh connection after another, for 3 s, each timed from
# before the connect to its grant (bash's clock, no process started): "µs-waited reply" lines.
prober() {
    local end=$((${EPOCHREALTIME/./} + 3000000)) s e r p
    while [ "${EPOCHREALTIME/./}" -lt "$end" ]; do
        s=${EPOCHREALTIME/./}
        r=failed
        if exec {p}<>/dev/tcp/127.0.0.1/7654; then
            echo "lock,name:probe-$1" >&"$p"
            read -r -t 10 r <&"$p" || r=failed
            e=${EPOCHREALTIME/./}
            echo release >&"$p"
            read -r -t 10 _ <&"$p"
            exec {p}<&-
        fi
        echo "$((${e:-$s} - s)) $r"
    done
}
pause() {
    local what=$1 s n bad p50 p99 max probers=()
    rm -f /tmp/probe.*
    for j in 1 2 3; do
        prober "$j" >/tmp/probe.$j &
        probers+=($!)
    done
    sleep 1
    mark
    s=$(date +%s%N)
    $what
    echo "INFO: $what with $holders holders took $(ms_since "$s") ms"
    wait "${probers[@]}"
    since_mark | grep -E "handed over|re-executing with|took over" | sed 's/^/INFO:   /'
    cat /tmp/probe.* | sort -n >/tmp/probes
    n=$(wc -l </tmp/probes)
    bad=$(awk '$2 != "ok"' /tmp/probes | wc -l)
    p50=$(awk -v n="$n" 'NR == int(n * 0.5 + 0.5) { printf "%.1f", $1 / 1000 }' /tmp/probes)
    p99=$(awk -v n="$n" 'NR == int(n * 0.99 + 0.5) { printf "%.1f", $1 / 1000 }' /tmp/probes)
    max=$(tail -n 1 /tmp/probes | awk '{ printf "%.1f", $1 / 1000 }')
    echo "INFO: $what: $n lock requests on fresh connections from 3 clients over 3 s: p50 $p50 ms, p99 $p99 ms, longest $max ms"
    check "$what: no lock request failed ($bad of $n)" [ "$bad" = 0 ]
    kept=0
    for fd in "${fds[@]}"; do
        echo ".keepalive" >&"$fd"
        [ "$(next "$fd" 10)" = alive ] && kept=$((kept + 1))
    done
    check "$what: $kept of $holders holders still hold, on the same connections" [ "$kept" = "$holders" ]
    other=$(ask "lock,name:h$holders")
    check "$what: their locks are still held (a new client got '$other')" [ "$other" = not-granted ]
}
pause "systemctl restart tcpnetlock.service"
pause "systemctl reload tcpnetlock.service"
# A command run by `tcpnetlock do` keeps running across a restart (its default --on-lost
# terminate would end it if the lock were lost).
tcpnetlock do --host 127.0.0.1 --lock-name do-job -- sleep 3 &
job=$!
for _ in $(seq 100); do ask .locks | grep -q '"do-job"' && break; sleep 0.05; done
systemctl restart tcpnetlock.service
wait "$job"
rc=$?
check "tcpnetlock do: the command outlived the restart and do exited 0 (got $rc)" [ "$rc" = 0 ]
for fd in "${fds[@]}"; do exec {fd}<&-; done

# --- IPAddressDeny on the socket: only 127.0.0.1 may connect; 127.0.0.2 is refused by the kernel --
mkdir -p /etc/systemd/system/tcpnetlock.socket.d
cat >/etc/systemd/system/tcpnetlock.socket.d/allow.conf <<'CONF'
[Socket]
IPAddressDeny=any
IPAddressAllow=127.0.0.1
CONF
systemctl daemon-reload
systemctl stop tcpnetlock.service tcpnetlock.socket
systemctl start tcpnetlock.socket
check "socket restarted with the drop-in" [ "$(systemctl is-active tcpnetlock.socket)" = active ]
allowed=$(echo ".ping" | nc -N -w 5 -s 127.0.0.1 127.0.0.1 7654 | head -n 1)
check "allowed peer served (got '$allowed')" [ "$allowed" = pong ]
denied=$(echo ".ping" | timeout 8 nc -N -w 3 -s 127.0.0.2 127.0.0.1 7654 | head -n 1)
check "denied peer blocked by IPAddressDeny (got '$denied')" [ -z "$denied" ]
rm -r /etc/systemd/system/tcpnetlock.socket.d
systemctl daemon-reload
systemctl restart tcpnetlock.socket

echo "INFO: $(systemd-analyze security tcpnetlock.service --no-pager 2>&1 | tail -n 1)"

# --- package upgrade: the new package's postinst restarts the service, which hands over -----------
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:upgraded,fencing:1" >&7
read -r -t 10 reply <&7
held_token=$(token "$reply")
exec 8<>/dev/tcp/127.0.0.1/7654
echo "lock,name:upgraded,fencing:1,wait:120" >&8
waiting 1
pid=$(svc MainPID)
before=$(dpkg-query -W -f '${Version}' tcpnetlock)
socket_since=$(prop ActiveEnterTimestampMonotonic tcpnetlock.socket)
mark
dpkg -i /root/tcpnetlock-upgrade.deb >/tmp/dpkg.log 2>&1 || sed 's/^/INFO:   dpkg: /' /tmp/dpkg.log
after=$(dpkg-query -W -f '${Version}' tcpnetlock)
newpid=$(svc MainPID)
since_mark | grep -E "handed over|took over" | sed 's/^/INFO:   /'
check "upgrade: $before -> $after installed, the service restarted ($pid -> $newpid)" \
    [ "$after" != "$before" ] && [ "$newpid" != "$pid" ] && [ "$newpid" != 0 ]
check "upgrade: the new binary runs ($(readlink /proc/"$newpid"/exe))" \
    [ "$(readlink /proc/"$newpid"/exe)" = /usr/bin/tcpnetlock ] \
    && grep -qa "tcpnetlock e2e upgrade $after" /proc/"$newpid"/exe
check "upgrade: the socket was never restarted" \
    [ "$(prop ActiveEnterTimestampMonotonic tcpnetlock.socket)" = "$socket_since" ]
echo ".keepalive" >&7
r=$(next 7 5)
check "upgrade: the holder is answered on the same connection (got '$r')" [ "$r" = alive ]
other=$(ask "lock,name:upgraded")
check "upgrade: the lock is still held (a new client got '$other')" [ "$other" = not-granted ]
echo release >&7
r=$(next 7 5)
check "upgrade: the holder releases (got '$r')" [ "$r" = released ]
r=$(next 8 5)
check "upgrade: the waiter is granted in its turn with a larger token (got '$r', holder had $held_token)" \
    [ "${r%%:*}" = ok,token ] && [ "$(token "$r")" -gt "$held_token" ]
exec 7<&- 8<&-

# --- removal stops: every connection closes ---------------------------------------------------------
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:removed" >&7
read -r -t 10 reply <&7
dpkg -r tcpnetlock >/tmp/dpkg.log 2>&1 || sed 's/^/INFO:   dpkg: /' /tmp/dpkg.log
r=$(next 7 5)
check "removal: the holder's connection ends (got $r)" [ "$r" = EOF ]
check "removal: the socket is stopped ($(systemctl is-active tcpnetlock.socket))" \
    [ "$(systemctl is-active tcpnetlock.socket)" != active ]
exec 7<&-

if [ "$failed" != 0 ]; then
    echo "INFO: diagnostics follow"
    systemctl --no-pager status tcpnetlock.socket tcpnetlock.service 2>&1 | sed 's/^/INFO: /'
    journalctl --no-pager -n 40 -u tcpnetlock.service -u tcpnetlock.socket 2>&1 | sed 's/^/INFO: /'
fi
echo "RESULT: failed=$failed"
systemctl exit $((failed ? 3 : 0)) --no-block
