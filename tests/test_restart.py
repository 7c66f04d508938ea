"""Start-up of worker 0 on an existing state directory: the spool survives intact,
the journal is compacted, finished segments go, and the queue knows what is left."""
import os

import pytest

from mailsys import spool as spool_mod
from mailsys.config import load
from mailsys.journal import replay
from mailsys.tap import build
from tests.helpers import SyncOffload, write_host_config


@pytest.fixture
def sync(monkeypatch):
    monkeypatch.setattr(spool_mod, "Offload", SyncOffload)


def config(tmp_path):
    return load(write_host_config(tmp_path))


def spool_messages(tmp_path, ids):
    from twisted.internet import reactor

    s = spool_mod.Spool(str(tmp_path / "state" / "spool"), reactor)
    s.open()
    for qid in ids:
        w = s.new_message(qid)
        w.write(b"Subject: " + qid.encode() + b"\r\n\r\nbody\r\n")
        s.commit(w, {"sender": "a@b.org", "arrival": 0,
                     "recipients": [{"rcpt": "joe@example.org", "state": "queued"}]})
    segment = s.current_segment
    s.close()
    return segment


def close_host(host):
    """Stop what start-up opened, even when it failed half-way: a spool thread
    left running would keep pytest from exiting after a failure."""
    host.spool.close()
    if getattr(host, "journal", None) is not None:
        host.journal.close()


def test_restart_keeps_every_segment_byte_for_byte(sync, tmp_path):
    cfg = config(tmp_path)
    segment = spool_messages(tmp_path, ["A1", "A2", "A3"])
    before = open(segment, "rb").read()
    host = build(cfg, nworkers=1)
    try:
        host.privilegedStartService()
        assert open(segment, "rb").read() == before
        assert sorted(host.queue.messages) == ["A1", "A2", "A3"]
        fd_target = os.readlink(f"/proc/self/fd/{host.spool._fd}")
        assert fd_target == host.spool.current_segment and os.path.exists(fd_target)
        assert replay(os.path.join(cfg.server.state_dir, "spool", "queue.jnl")) == []
    finally:
        close_host(host)


def test_finished_segments_are_removed_and_the_journal_compacted(sync, tmp_path):
    from mailsys.journal import rewrite

    cfg = config(tmp_path)
    done_segment = spool_messages(tmp_path, ["D1", "D2"])
    live_segment = spool_messages(tmp_path, ["L1"])
    jnl = os.path.join(cfg.server.state_dir, "spool", "queue.jnl")
    rewrite(jnl, [{"id": "D1", "r": 0, "s": "sent"}, {"id": "D1", "done": True},
                  {"id": "D2", "done": True},
                  {"id": "L1", "r": 0, "s": "deferred", "e": "451 4.4.1 later"}])
    host = build(cfg, nworkers=1)
    try:
        host.privilegedStartService()
        assert not os.path.exists(done_segment)
        assert os.path.exists(live_segment)
        assert list(host.queue.messages) == ["L1"]
        assert replay(jnl) == [{"id": "L1", "r": 0, "s": "deferred", "e": "451 4.4.1 later"}]
    finally:
        close_host(host)


def test_a_state_directory_in_use_stops_the_start_in_one_sentence(sync, tmp_path, monkeypatch):
    """Another instance holds STATE_DIR/mailsys.lock: twistd says so and exits 1,
    instead of printing a traceback (SystemExit carries the sentence)."""
    import fcntl

    from mailsys import tap

    monkeypatch.setattr(tap, "LOCK_WAIT", 0.0)
    cfg = config(tmp_path)
    state = cfg.server.state_dir
    os.makedirs(state, exist_ok=True)
    other = os.open(os.path.join(state, "mailsys.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    host = build(cfg, nworkers=1)
    try:
        with pytest.raises(SystemExit) as e:
            host.privilegedStartService()
        assert str(e.value) == (f"mailsys: cannot start: another mailsys is running on {state} "
                                f"(it holds {state}/mailsys.lock); stop it first")
    finally:
        os.close(other)
        close_host(host)


def test_a_listener_that_cannot_be_opened_stops_the_start_in_one_sentence(sync, tmp_path):
    """The port is taken: decided only at bind time, so config check cannot see
    it; the start stops with the role, the endpoint and the reason."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    from tests.helpers import write_host_config

    cfg = load(write_host_config(tmp_path, mta=[f"tcp:{port}:interface=127.0.0.1"]))
    host = build(cfg, nworkers=1)
    try:
        with pytest.raises(SystemExit) as e:
            host.privilegedStartService()
        assert str(e.value) == (
            f"mailsys: cannot start: listen.mta tcp:{port}:interface=127.0.0.1: cannot listen "
            f"on 127.0.0.1:{port}: Address already in use; stop what uses it or change "
            f"listen.mta")
    finally:
        taken.close()
        for p in host.ports + host.control_ports:
            p.stopListening()
        close_host(host)
