"""A worker that serves the queue's LMTP socket steers its receiving listeners
by its MDA's load; worker 0 and a worker without that socket do not.  Built as
mailsys.workers builds one, adopting real listening sockets; the global reactor
is never run (the ports are taken out of it again at the end)."""
import socket

import pytest
from twisted.internet import reactor

from mailsys.config import load
from mailsys.tap import QUEUE_LMTP, build
from tests.helpers import write_host_config


def write_config(tmp_path):
    return write_host_config(tmp_path, workers=2, mta=["tcp:0:interface=127.0.0.1"],
                             lmtp=[f"unix:{tmp_path / 'lmtp.sock'}"],
                             extra=f"[mailbox]\nroot = \"{tmp_path / 'mail'}\"\n")


def listening(family):
    if family == socket.AF_UNIX:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0mailsys-test-%d" % id(s))       # abstract: no file to clean up
    else:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
    s.listen(5)
    return s


@pytest.fixture
def worker_host(tmp_path):
    path = write_config(tmp_path)
    config = load(path)
    host = build(config, reactor, worker=1, nworkers=2, config_path=path)
    socks, adopt = [], []
    for role, endpoint, _ in host.listeners:
        family = socket.AF_UNIX if endpoint.startswith("unix:") else socket.AF_INET
        s = listening(family)
        socks.append(s)
        adopt.append((role, endpoint, s.detach(), int(family)))
    host.adopt = adopt
    host.privilegedStartService()
    yield host
    for port in host.ports:
        reactor.removeReader(port)
        port.socket.close()
    host.spool.close()


def test_a_worker_storing_the_queues_mail_steers_its_smtp_listeners(worker_host):
    host = worker_host
    roles = [role for role, _, _ in host.listeners]
    assert QUEUE_LMTP in roles and "mta" in roles
    mta_port = host.ports[roles.index("mta")]
    assert host.steering is not None
    assert host.steering.ports == [mta_port]          # not the LMTP listeners
    assert host.mda.batcher.on_load == host.steering.load
    assert mta_port in reactor.getReaders()
    host.steering.load(host.steering.high)
    assert mta_port not in reactor.getReaders()
    assert all(p in reactor.getReaders() for r, p in zip(roles, host.ports) if r != "mta")
    host.steering.load(host.steering.low)
    assert mta_port in reactor.getReaders()


def test_worker_zero_never_steers(tmp_path):
    path = write_config(tmp_path)
    host = build(load(path), reactor, worker=0, nworkers=2, config_path=path)
    assert host.steering is None and host.mda.batcher.on_load is None


def test_every_lmtp_listener_of_the_mda_has_the_size_headroom(worker_host):
    from mailsys.mda.lmtp import SIZE_HEADROOM

    lmtp = [(role, factory) for role, _, factory in worker_host.listeners
            if role in ("lmtp", QUEUE_LMTP)]
    assert sorted(role for role, _ in lmtp) == sorted(["lmtp", QUEUE_LMTP])
    size = worker_host.config.limits.message_size
    assert [f.limits.message_size for _, f in lmtp] == [size + SIZE_HEADROOM] * 2
