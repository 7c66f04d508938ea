"""The maildrop: files written by ``mailsys sendmail`` while the server is down,
picked up by worker 0 (task.Clock, a temporary directory, a fake spool side)."""
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from mailsys import maildrop


class Host:
    def __init__(self, state, answer=None):
        self.config = SimpleNamespace(server=SimpleNamespace(state_dir=str(state)),
                                      limits=SimpleNamespace(message_size=1000))
        self.submitted = []
        self.answer = answer or {"ok": True, "id": "AB12"}

    def submit_local(self, sender, rcpts, message, *, uid=None, smtputf8=False, dsn=None):
        self.submitted.append((sender, rcpts, message, uid, dsn))
        return defer.succeed(self.answer)


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    maildrop.prepare(h.config)
    return h


def request(**kw):
    r = {"cmd": "submit", "sender": "cron@example.com", "recipients": ["joe@example.com"], "size": 9}
    r.update(kw)
    return r


def test_a_drop_is_spooled_then_removed(host):
    path = maildrop.drop(host.config, request(notify=["FAILURE"]), b"Subject:\n")
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert oct(os.stat(maildrop.maildrop_path(host.config)).st_mode & 0o7777) == "0o1733"
    pickup = maildrop.Pickup(host, task.Clock())
    pickup.scan()
    assert host.submitted == [("cron@example.com", ["joe@example.com"], b"Subject:\r\n",
                               os.getuid(), {"notify": ["FAILURE"]})]
    assert os.listdir(maildrop.maildrop_path(host.config)) == []


def test_a_refused_spool_write_leaves_the_file_for_the_next_pass(tmp_path):
    host = Host(tmp_path, {"ok": False, "error": "disk full"})
    maildrop.prepare(host.config)
    maildrop.drop(host.config, request(), b"Subject:\n")
    clock = task.Clock()
    pickup = maildrop.Pickup(host, clock)
    pickup.start()
    assert len(host.submitted) == 1
    assert len(os.listdir(maildrop.maildrop_path(host.config))) == 1
    host.answer = {"ok": True, "id": "CD34"}
    clock.advance(maildrop.PICKUP_INTERVAL)
    assert len(host.submitted) == 2
    assert os.listdir(maildrop.maildrop_path(host.config)) == []
    pickup.stop()


@pytest.mark.parametrize("name, content", [
    ("0123456789abcdef0123456789abcdef.drop", b"not json\nSubject:\n"),
    ("0123456789abcdef0123456789abcdef.drop", json.dumps(request(size=3)).encode() + b"\nSubject:\n"),
    ("0123456789abcdef0123456789abcdef.drop", json.dumps(request(cmd="list")).encode() + b"\n"),
    ("0123456789abcdef0123456789abcdef.drop",
     json.dumps(request(recipients=["a b@c"])).encode() + b"\nSubject:\n"),
    ("0123456789abcdef0123456789abcdef.drop", b"x" * (maildrop.MAX_HEADER + 1001)),
    ("../escape.drop", b""),
    ("evil.drop", json.dumps(request()).encode() + b"\nSubject:\n"),
])
def test_anything_else_is_removed_and_never_spooled(host, name, content):
    directory = maildrop.maildrop_path(host.config)
    target = os.path.join(directory, os.path.basename(name))
    with open(target, "wb") as f:
        f.write(content)
    maildrop.Pickup(host, task.Clock()).scan()
    assert host.submitted == []
    assert os.listdir(directory) == []


def test_links_are_never_followed(host, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(json.dumps(request()).encode() + b"\nSubject:\n")
    directory = maildrop.maildrop_path(host.config)
    os.symlink(secret, os.path.join(directory, "0123456789abcdef0123456789abcdef.drop"))
    os.link(secret, os.path.join(directory, "fedcba9876543210fedcba9876543210.drop"))
    maildrop.Pickup(host, task.Clock()).scan()
    assert host.submitted == []
    assert os.listdir(directory) == [] and secret.exists()


def test_abandoned_temporary_files_go_after_an_hour(host):
    directory = maildrop.maildrop_path(host.config)
    tmp = os.path.join(directory, "tmp-abc")
    open(tmp, "wb").close()
    clock = task.Clock()
    clock.advance(os.stat(tmp).st_mtime + 10)
    pickup = maildrop.Pickup(host, clock)
    pickup.scan()
    assert os.path.exists(tmp)          # a client may still be writing it
    clock.advance(maildrop.STALE_TEMPORARY)
    pickup.scan()
    assert not os.path.exists(tmp)
