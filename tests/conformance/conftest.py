"""pytest conftest that runs tcpnetlock 0.1.8's own test suite against our Rust server.

run.sh copies this file to the root of the extracted 0.1.8 sdist. The suite's `lock_server`
fixture (tests/test_utils.py) builds `ServerThread()` by global name lookup, so replacing that
module attribute swaps the in-process Python server for our binary while the fixture itself,
teardown included, runs unchanged.
"""
import os
import re
import subprocess
import time

import tests.test_utils
from tcpnetlock.client.client import LockClient

BIN = os.environ["TCPNETLOCK_BIN"]
LOG_DIR = os.environ["TCPNETLOCK_LOG_DIR"]
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
# Set (etcd client URLs) to run the suite against cluster members (`--etcd`), each server a lock
# space of its own; the port is taken once the member says it serves locks.
ETCD = os.environ.get("TCPNETLOCK_CONFORMANCE_ETCD")
SERVING = "cluster: member conformance serves locks"

_started = []  # every server spawned, so pytest_unconfigure can kill leftovers


class RustServer:
    """Stands in for test_utils.ServerThread: same constructor, .port, get_client(), start(),
    is_alive() and join(timeout), backed by a `tcpnetlock server` subprocess."""

    def __init__(self, port=0):
        # Like ServerThread, the socket is bound (and .port known) once the constructor returns.
        self.log_path = os.path.join(LOG_DIR, "server-%d.log" % (len(_started) + 1))
        args = [BIN, "server", "--listen", "127.0.0.1:%d" % port, "--log", "stderr",
                "--allow-shutdown-from-loopback"]
        if ETCD:
            args += ["-v", "--etcd", ETCD, "--etcd-name", "conformance",
                     "--etcd-prefix", "/conformance-%d-%d/" % (os.getpid(), len(_started) + 1)]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        _started.append(self)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout=10.0):
        # The log goes to a file (no pipe to drain, kept for post-mortems); poll it for the line.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as log:
                text = log.read()
            match = LISTENING.search(text)
            if match and (not ETCD or SERVING in text):
                return int(match.group(1))
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("%s did not report 'listening on'; log: %s" % (BIN, self.log_path))

    def get_client(self, **kwargs) -> LockClient:
        # Same defaults as ServerThread.get_client; LockClient is AF_INET, so localhost is 127.0.0.1.
        host = kwargs.pop("host", "localhost")
        port = kwargs.pop("port", self.port)
        return LockClient(host, port, **kwargs)

    def start(self):
        pass  # the process serves from the moment it is spawned

    def is_alive(self):
        return self._proc.poll() is None

    def join(self, timeout=None):
        # Thread.join semantics (return quietly on timeout), plus: after `.server-shutdown`
        # our server must exit with status 0, so a non-zero exit fails the fixture teardown.
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        assert code == 0, "server exited with status %s; log: %s" % (code, self.log_path)

    def kill(self):
        if self.is_alive():
            self._proc.kill()
            self._proc.wait()


tests.test_utils.ServerThread = RustServer


# Second pass (run.sh --dropin): 0.1.8's CLI tests start `python -m tcpnetlock.cli.tnl_do ...`
# (also behind `timeout 1s env VAR=...`); run our binary under the original name instead.
DROPIN_DIR = os.environ.get("TCPNETLOCK_DROPIN_DIR")
DROPIN_MODULES = {
    "tcpnetlock.cli.tnl_do": "tcpnetlock_do",
    "tcpnetlock.cli.tnl_client": "tcpnetlock_client",
    "tcpnetlock.cli.tnl_server": "tcpnetlock_server",
}


def _dropin_args(args):
    for i in range(len(args) - 2):
        if args[i] == "python" and args[i + 1] == "-m" and args[i + 2] in DROPIN_MODULES:
            program = os.path.join(DROPIN_DIR, DROPIN_MODULES[args[i + 2]])
            return args[:i] + [program] + args[i + 3:]
    raise AssertionError("--dropin: no 0.1.8 program to replace in %r" % (args,))


if DROPIN_DIR:
    _subprocess_run = subprocess.run

    def _run_dropin(args, *rest, **kwargs):
        if isinstance(args, list):
            args = _dropin_args(args)
        return _subprocess_run(args, *rest, **kwargs)

    subprocess.run = _run_dropin


def pytest_unconfigure(config):
    # A failed teardown must not leave a server running after pytest exits.
    for server in _started:
        server.kill()
