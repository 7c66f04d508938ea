"""Local users and the server's unix sockets: a socket the configuration (or the
design) makes private stays private, whichever process listens on it.

Twisted's ``adoptStreamPort`` chmods an adopted unix socket to 0666; every worker
process adopts the listening sockets of worker 0, so without care a ``listen.lmtp``
of ``mode=0600`` (or the queue's own ``STATE_DIR/lmtp-queue.sock``) became
world-writable when the first worker started, and any local user could hand the
MDA mail for any mailbox.  The end-to-end check with real processes is
tests/integration/test_queue_e2e.py::test_the_queue_reaches_the_mda_workers_through_its_own_socket.
"""
import os
import socket
import stat

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from mailsys.tap import adopt_port


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_an_adopted_unix_socket_keeps_its_mode(tmp_path, mode):
    """Twisted's adoptStreamPort would make the file 0666 (world-writable LMTP)."""
    path = tmp_path / "lmtp.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(5)
    listening.setblocking(False)
    os.chmod(path, mode)
    port = adopt_port(MemoryReactor(), listening.fileno(), socket.AF_UNIX, Factory())
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert port.getHost().name in (str(path), str(path).encode())
    finally:
        port.socket.close()
        listening.close()


def test_a_tcp_listener_is_adopted_as_before():
    """Only unix sockets need the care; TCP goes through Twisted's own adoption."""
    from twisted.internet.testing import MemoryReactor as Reactor

    calls = []

    class Recording(Reactor):
        def adoptStreamPort(self, fd, family, factory):
            calls.append((fd, family))
            return "port"

    assert adopt_port(Recording(), 7, socket.AF_INET, Factory()) == "port"
    assert calls == [(7, socket.AF_INET)]


# --- with real processes: a local user who is not the service user ---------------------------

NOBODY = 65534

# perl-base is Essential in Debian, and readable by everyone (our Python may not be).
CONNECT = r"""
use Socket;
socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
if (!connect($s, sockaddr_un($ARGV[0]))) {
    if ($!{EACCES}) { print "EACCES\n"; exit 0 }
    die "connect: $!";
}
my $line = <$s>;
my ($code) = split / /, $line;
print "$code\n";
"""


def as_nobody(path):
    """What an unprivileged local user gets when connecting to ``path``."""
    import subprocess

    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    p = subprocess.run(["perl", "-e", CONNECT, str(path)], preexec_fn=drop,
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.fixture
def open_dir():
    """A directory every local user may pass through (as ``state_dir`` is, 0711), so
    only the socket's own mode decides."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="mailsys-sock-", dir="/tmp")
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
@pytest.mark.parametrize("mode, expected", [(None, "EACCES"), ("0666", "220")])
def test_a_local_user_reaches_the_mda_only_where_the_operator_allows(tmp_path, open_dir, mode,
                                                                     expected):
    """listen.lmtp without ``mode=`` is for the service user alone (LMTP asks for no
    password: whoever connects can write into any mailbox); ``mode=0666`` opens it,
    as docs/mda.rst says for Postfix's lmtp client.  Two worker processes, so the
    sockets have been adopted by worker 1 when we look."""
    import time

    from tests.integration.harness import MailsysServer

    sock = os.path.join(open_dir, "lmtp.sock")
    endpoint = f"unix:{sock}" + (f":mode={mode}" if mode else "")
    server = MailsysServer(tmp_path / "mailsys", {"listen": {"lmtp": [endpoint]},
                                                  "server": {"workers": 2}})
    try:
        server.start()
        deadline = time.monotonic() + 30
        while server.log_text().count("lmtp-queue.sock'") < 2:   # worker 0, then worker 1
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.05)
        assert oct(stat.S_IMODE(os.stat(sock).st_mode)) == oct(int(mode or "0600", 8))
        assert as_nobody(sock) == expected
        queue_sock = server.state_dir / "lmtp-queue.sock"
        assert stat.S_IMODE(queue_sock.stat().st_mode) == 0o600
        os.chmod(server.state_dir, 0o711)        # as it is; only the socket's mode protects it
        assert as_nobody(queue_sock) in ("EACCES",)
    finally:
        server.cleanup()
