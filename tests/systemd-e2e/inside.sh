#!/bin/bash
# Runs inside the booted container (see run.sh), as a oneshot unit during boot.
exec > >(tee /var/log/tcpnetlock-e2e.txt) 2>&1
failed=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=1; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
prop() { systemctl show -P "$1" "$2"; }

echo "INFO: pid1=$(cat /proc/1/comm) systemd=$(systemctl --version | head -n 1)"

check "socket enabled by the package" [ "$(systemctl is-enabled tcpnetlock.socket)" = enabled ]
check "socket listening" [ "$(systemctl is-active tcpnetlock.socket)" = active ]
check "service inactive before the first connection" [ "$(systemctl is-active tcpnetlock.service)" = inactive ]

# The holder keeps its connection on fd 7 (bash's /dev/tcp).
exec 7<>/dev/tcp/127.0.0.1/7654
echo "lock,name:e2e" >&7
read -r -t 10 reply <&7
check "lock granted through the activated socket (got '$reply')" [ "$reply" = ok ]
other=$(echo "lock,name:e2e" | nc -N -w 5 127.0.0.1 7654 | head -n 1)
check "second client refused (got '$other')" [ "$other" = not-granted ]
check "service active once serving" [ "$(systemctl is-active tcpnetlock.service)" = active ]
check "Type=notify: READY=1 and STATUS= received ($(prop StatusText tcpnetlock.service))" \
    grep -q "locks held" <<<"$(prop StatusText tcpnetlock.service)"
check "watchdog armed" [ "$(prop WatchdogUSec tcpnetlock.service)" = 30s ]

pid=$(prop MainPID tcpnetlock.service)
uid=$(awk '/^Uid:/ {print $2}' /proc/"$pid"/status)
check "runs as a dynamic user (uid $uid)" [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ]
check "under a seccomp filter" grep -q '^Seccomp:[[:space:]]*2' /proc/"$pid"/status
check "no new privileges" grep -q '^NoNewPrivs:[[:space:]]*1' /proc/"$pid"/status
check "its log is in the journal" \
    grep -q "serving 127.0.0.1:7654 (socket passed by systemd)" <<<"$(journalctl -u tcpnetlock.service -o cat)"
check "the keepalive of the socket unit is in force" \
    grep -q "dead peers dropped within 40s" <<<"$(journalctl -u tcpnetlock.service -o cat)"

# Restart: the holder's connection ends (its lock with it), the socket keeps accepting.
systemctl restart tcpnetlock.service
read -r -t 5 gone <&7; rc=$?
check "restart ends the holder's connection" [ "$rc" != 0 ] || [ -z "$gone" ]
exec 7<&-
again=$(echo "lock,name:e2e" | nc -N -w 5 127.0.0.1 7654 | head -n 1)
check "after a restart the socket serves again (got '$again')" [ "$again" = ok ]
check "socket still active after the restart" [ "$(systemctl is-active tcpnetlock.socket)" = active ]

# IPAddressDeny on the socket: only 127.0.0.1 may connect; 127.0.0.2 is refused by the kernel.
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

if [ "$failed" != 0 ]; then
    echo "INFO: diagnostics follow"
    systemctl --no-pager status tcpnetlock.socket tcpnetlock.service 2>&1 | sed 's/^/INFO: /'
    journalctl --no-pager -n 30 -u tcpnetlock.service -u tcpnetlock.socket 2>&1 | sed 's/^/INFO: /'
fi
echo "INFO: $(systemd-analyze security tcpnetlock.service --no-pager 2>&1 | tail -n 1)"
echo "RESULT: failed=$failed"
systemctl exit $((failed ? 3 : 0)) --no-block
