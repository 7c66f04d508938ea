"""The control socket protocol on StringTransport: one request, one answer."""
import json
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailsys.control import (MAX_REQUEST, QUEUE_COMMANDS, REQUEST_TIMEOUT, ControlProtocol,
                             normalise_newlines)


class Queue:
    def __init__(self):
        self.calls = []

    def list(self):
        return [{"id": "AB12"}]

    def flush(self, domain=None):
        self.calls.append(("flush", domain))
        return 3

    def find(self, qid):
        return []

    def hold(self, qid):
        self.calls.append(("hold", qid))
        return defer.succeed(["AB12"] if qid in ("AB12", "ALL") else [])

    delete = release = hold


class Host:
    def __init__(self):
        self.reactor = task.Clock()
        self.queue = Queue()
        self.config = SimpleNamespace(limits=SimpleNamespace(message_size=1000))
        self.submitted = []

    def submit_local(self, sender, rcpts, message, *, uid=None, smtputf8=False, dsn=None):
        self.submitted.append((sender, rcpts, message, smtputf8, dsn))
        return defer.succeed({"ok": True, "id": "5EED"})


def run(data, allowed=QUEUE_COMMANDS + ("submit",), host=None, step=None):
    host = host or Host()
    proto = ControlProtocol(host, frozenset(allowed))
    t = StringTransport()
    proto.makeConnection(t)
    if step is None:
        proto.dataReceived(data)
    else:
        for i in range(0, len(data), step):
            proto.dataReceived(data[i:i + step])
    out = t.value()
    return (json.loads(out) if out else None), t.disconnecting, host


def test_list_and_flush():
    assert run(b'{"cmd": "list"}\n')[:2] == ({"ok": True, "messages": [{"id": "AB12"}]}, True)
    answer, _, host = run(b'{"cmd": "flush", "domain": "example.net"}\n')
    assert answer == {"ok": True, "count": 3} and host.queue.calls == [("flush", "example.net")]


@pytest.mark.parametrize("request_, error", [
    (b"not json\n", "the request is not JSON"),
    (b'["list"]\n', "the request names no command"),
    (b'{"cmd": "rm -rf"}\n', "'rm -rf' is not allowed on this socket"),
    (b'{"cmd": "hold"}\n', "a queue id is required"),
    (b'{"cmd": "hold", "id": "../../x"}\n', "'../../x' is not a queue id"),
    (b'{"cmd": "hold", "id": "FFFF"}\n', "no message FFFF in the queue to hold"),
    (b'{"cmd": "show", "id": "FFFF"}\n', "no message FFFF in the queue"),
    (b'{"cmd": "flush", "domain": "a b"}\n', "a domain name is required"),
    (b'{"cmd": "submit", "size": 2000, "recipients": ["a@b.c"]}\n',
     "message too big: 2000 bytes; limits.message_size is 1000"),
    (b'{"cmd": "submit", "size": 1, "recipients": []}\n', "no recipients"),
    (b'{"cmd": "submit", "size": 1, "recipients": ["a\\r\\nb@c.d"]}\n',
     "bad recipient address 'a\\r\\nb@c.d': Bad recipient address syntax"),
    (b'{"cmd": "submit", "size": 1, "sender": "x y@z", "recipients": ["a@b.c"]}\n',
     "bad sender address 'x y@z': Bad sender address syntax"),
    (b'{"cmd": "submit", "size": 1, "recipients": [1]}\n', "addresses must be strings"),
    (b'{"cmd": "submit", "size": 1, "recipients": ["a@b.c"], "notify": ["NEVER", "DELAY"]}\n',
     "bad DSN notify list"),
])
def test_bad_requests_get_one_clear_answer(request_, error):
    answer, closed, host = run(request_)
    assert answer == {"ok": False, "error": error}
    assert closed and host.submitted == [] and host.queue.calls in ([], [("hold", "FFFF")])


def test_the_public_socket_takes_only_mail():
    answer, _, host = run(b'{"cmd": "delete", "id": "ALL"}\n', allowed=("submit",))
    assert answer == {"ok": False, "error": "'delete' is not allowed on this socket"}
    assert host.queue.calls == []


def test_an_endless_request_line_is_cut_off():
    answer, closed, _ = run(b"x" * (MAX_REQUEST + 2))
    assert answer == {"ok": False, "error": "request too long"} and closed


def test_a_silent_client_times_out():
    host = Host()
    proto = ControlProtocol(host, frozenset(QUEUE_COMMANDS))
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(b'{"cmd": ')
    host.reactor.advance(REQUEST_TIMEOUT)
    assert json.loads(t.value()) == {"ok": False, "error": "request timed out"}


SUBMIT = (b'{"cmd": "submit", "sender": "", "recipients": ["joe@example.com"], "size": 15, '
          b'"notify": ["SUCCESS"], "ret": "HDRS"}\nSubject: x\n\nb\r\r')


@pytest.mark.parametrize("step", [None] + list(range(1, 12)) + [len(SUBMIT) - 1])
def test_submit_at_every_split_gives_the_same_message(step):
    answer, closed, host = run(SUBMIT, step=step)
    assert answer == {"ok": True, "id": "5EED"} and closed
    assert host.submitted == [("", ["joe@example.com"], b"Subject: x\r\n\r\nb\r\n\r\n", False,
                               {"notify": ["SUCCESS"], "ret": "HDRS"})]


def test_more_data_than_announced_is_refused():
    answer, _, host = run(SUBMIT + b"extra")
    assert answer == {"ok": False, "error": "more message data than announced"}
    assert host.submitted == []


def test_utf8_addresses_mark_the_message_smtputf8():
    req = '{"cmd": "submit", "recipients": ["jöe@example.com"], "size": 0}\n'.encode()
    answer, _, host = run(req)
    assert answer["ok"] and host.submitted[0][3] is True


def test_normalise_newlines_leaves_no_bare_cr_or_lf():
    assert normalise_newlines(b"a\nb\rc\r\nd\n\r") == b"a\r\nb\r\nc\r\nd\r\n\r\n"
