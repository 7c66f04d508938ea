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
    answer, _, host = run(b'{"cmd": "flush", "domain": "@Example.NET"}\n')    # as ETRN takes it
    assert answer == {"ok": True, "count": 3} and host.queue.calls == [("flush", "example.net")]


def test_lower_case_ids_name_the_same_message():
    answer, _, host = run(b'{"cmd": "hold", "id": "ab12"}\n')
    assert answer == {"ok": True, "ids": ["AB12"]} and host.queue.calls == [("hold", "AB12")]


@pytest.mark.parametrize("request_, error", [
    (b"not json\n", "the request is not JSON"),
    (b'["list"]\n', "the request names no command"),
    (b'{"cmd": "rm -rf"}\n', "'rm -rf' is not allowed on this socket"),
    (b'{"cmd": "hold"}\n', "hold needs a queue id, as 'mailsys queue list' shows them"),
    (b'{"cmd": "hold", "id": "../../x"}\n',
     "'../../x' is not a queue id: use one that 'mailsys queue list' shows"),
    (b'{"cmd": "hold", "id": "FFFF"}\n', "no message FFFF in the queue"),
    (b'{"cmd": "show", "id": "FFFF"}\n', "no message FFFF in the queue"),
    (b'{"cmd": "show", "id": "ALL"}\n',
     "show takes one queue id, not ALL: 'mailsys queue list' shows every message"),
    (b'{"cmd": "release", "id": "all"}\n', "write ALL in capitals to release every message"),
    (b'{"cmd": "flush", "domain": "a b"}\n', "'a b' is not a domain name: give one such as "
                                             "example.com or @example.com (both flush it and its "
                                             "subdomains)"),
    (b'{"cmd": "flush", "domain": ["x"]}\n', "flush --domain needs a domain name, such as "
                                             "example.com"),
    (b"[" * 50000 + b"\n", "the request is not JSON"),
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
], ids=lambda v: repr(v[:40]))
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


# -- against the real queue manager -------------------------------------------------------

@pytest.fixture
def live():
    """A Host whose queue is a QueueManager holding two deferred messages."""
    from mailsys.delivery import TempFail
    from mailsys.queue import QueueManager
    from mailsys.smtp.reply import Reply
    from tests.test_queue import Courier, Entry, Journal

    host = Host()
    config = SimpleNamespace(queue=SimpleNamespace(retry_min=300, retry_max=3600, lifetime=86400,
                                                   warn_after=0),
                             domains=SimpleNamespace(local=("example.com",)))
    lmtp = Courier("lmtp")
    lmtp.script = [[TempFail(Reply(451, "4.3.0", "later"))]] * 2
    host.queue = QueueManager(config=config, spool=None, journal=Journal(), clock=host.reactor,
                              lmtp=lmtp, local_domains=["example.com"], rng=lambda: 0.5)
    host.queue.startService()
    for qid in ("1A2B", "3C4D"):
        host.queue.add(Entry(qid, "a@b.org", ["joe@example.com"], message=b"Subject: s\r\n\r\nb\r\n"))
    host.reactor.advance(0)
    return host


@pytest.fixture
def failures():
    """Every event logged with a traceback while the test runs."""
    from twisted.logger import globalLogPublisher

    seen = []

    def observer(event):
        if "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_show_all_with_two_messages_is_a_clean_refusal(live, failures):
    answer, closed, _ = run(b'{"cmd": "show", "id": "ALL"}\n', host=live)
    assert answer == {"ok": False, "error": "show takes one queue id, not ALL: 'mailsys queue "
                                            "list' shows every message"}
    assert closed and failures == []
    answer, _, _ = run(b'{"cmd": "show", "id": "1a2b"}\n', host=live)
    assert answer["ok"] and answer["message"]["id"] == "1A2B"
    assert answer["message"]["headers"] == "Subject: s\r\n"


def test_hold_twice_and_release_of_one_not_held_say_so(live, failures):
    assert run(b'{"cmd": "release", "id": "1A2B"}\n', host=live)[0] == {
        "ok": True, "ids": [], "unchanged": ["1A2B"]}
    assert run(b'{"cmd": "hold", "id": "1A2B"}\n', host=live)[0] == {"ok": True, "ids": ["1A2B"]}
    records = list(live.queue.journal.records)
    assert run(b'{"cmd": "hold", "id": "1a2b"}\n', host=live)[0] == {
        "ok": True, "ids": [], "unchanged": ["1A2B"]}
    assert live.queue.journal.records == records          # nothing written twice
    assert run(b'{"cmd": "hold", "id": "FFFF"}\n', host=live)[0] == {
        "ok": False, "error": "no message FFFF in the queue"}
    assert failures == []


@pytest.mark.parametrize("request_", [
    b'{"cmd": "show", "id": null}', b'{"cmd": "show", "id": ["1A2B", "3C4D"]}',
    b'{"cmd": "show", "id": {"x": 1}}', b'{"cmd": "show", "id": 7}', b'{"cmd": "show", "id": ""}',
    b'{"cmd": "show", "id": "' + b"A" * 10000 + b'"}', b'{"cmd": "hold", "id": " ALL"}',
    b'{"cmd": "delete", "id": true}', b'{"cmd": "flush", "domain": 5}',
    b'{"cmd": "flush", "domain": "@"}', b'{"cmd": "flush", "domain": "' + b"a." * 200 + b'a"}',
    b'{"cmd": "lists", "json": [[[[]]]]}', b'{"cmd": ["list"]}', b'{"cmd": null}', b"null",
    b'"list"', b"1e999", b"[" * 100000, b"{" * 30000, b'{"cmd": "submit"}',
    b'{"cmd": "submit", "size": -1}', b'{"cmd": "submit", "size": 1, "recipients": "a@b.c"}',
    b'{"cmd": "submit", "size": 1, "recipients": ["a@b.c"], "notify": [[]]}',
    b'{"cmd": "submit", "size": 1, "recipients": ["a@b.c"], "ret": []}',
    b'{"cmd": "submit", "size": 1, "recipients": ["a@b.c"], "envid": {}}',
    b'{"cmd": "submit", "size": 1, "sender": 5, "recipients": ["a@b.c"]}',
    b'\xff\xfe\x00', b'{"cmd": "show", "id": "\\ud800"}',
], ids=lambda v: repr(v[:40]))
def test_any_request_shape_gets_a_clean_answer_and_no_traceback(live, failures, request_):
    before = dict(live.queue.messages)
    answer, closed, _ = run(request_[:MAX_REQUEST] + b"\n", host=live)
    assert answer is not None and closed and failures == []
    assert set(answer) == {"ok", "error"} and answer["ok"] is False
    assert isinstance(answer["error"], str) and "\n" not in answer["error"]
    assert live.queue.messages == before
