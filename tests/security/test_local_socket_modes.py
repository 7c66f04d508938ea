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
