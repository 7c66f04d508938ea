"""The MDA's LMTP side on StringTransport: one reply per recipient, in RCPT order."""
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.accounts import Expansion, User
from mailsys.delivery import TempFail
from mailsys.mda.lmtp import MDA, LMTPFactory, delivered_to
from mailsys.mda.memory import MemoryStore
from mailsys.smtp.reply import Reply


class Accounts:
    def __init__(self):
        self.users = {
            "joe@example.com": User("joe@example.com", "{ARGON2ID}x"),
            "ann@example.com": User("ann@example.com", "{ARGON2ID}x", quota=200),
            "box@example.com": User("box@example.com", "{ARGON2ID}x", store="mbox"),
        }
        self.aliases = {"team@example.com": ("joe@example.com", "ann@example.com"),
                        "postmaster@example.com": ("joe@example.com",)}

    def user(self, address):
        local, _, domain = address.rpartition("@")
        return self.users.get(f"{local.split('+')[0].lower()}@{domain.lower()}")

    def expand(self, address):
        key = address.lower()
        if key in self.aliases:
            return Expansion(local_users=self.aliases[key])
        user = self.user(address)
        return Expansion(local_users=(user.address,)) if user else Expansion()


@pytest.fixture
def session(tmp_path):
    return make_session(tmp_path)


def make_session(tmp_path, addr=None):
    """An LMTP server session on StringTransport over in-memory stores, for a
    client at ``addr`` (the listener's peer address)."""
    config = SimpleNamespace(
        mailbox=SimpleNamespace(root=str(tmp_path), default_store="maildir", quota=0),
        domains=SimpleNamespace(local=("example.com",)))
    stores = {"maildir": MemoryStore(), "mbox": MemoryStore()}
    clock = task.Clock()
    # Deliveries run on a worker thread in production; here, synchronously.
    mda = MDA(config, Accounts(), reactor=None, stores=stores, run=defer.maybeDeferred)
    limits = SimpleNamespace(message_size=10000, recipients=100, command_timeout=300,
                             data_timeout=600, auth_failures=3)
    proto = LMTPFactory(mda, limits, "mda.example.com", clock).buildProtocol(addr)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    return SimpleNamespace(proto=proto, t=t, stores=stores, root=str(tmp_path))


def run(s, data):
    s.t.clear()
    s.proto.dataReceived(data)
    return s.t.value()


def test_lhlo_and_no_ehlo(session):
    assert session.t.value() == b"220 mda.example.com LMTP\r\n"
    assert run(session, b"EHLO x\r\n") == b"500 5.5.2 Error: command not recognized\r\n"
    assert run(session, b"LHLO x\r\n") == (
        b"250-mda.example.com\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 HELP\r\n")


def test_one_reply_per_recipient_in_rcpt_order(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<box@example.com>\r\n"
                       b"RCPT TO:<joe+tag@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhello\r\n.\r\n")
    assert out.split(b"\r\n")[-10:] == [
        b"250 2.1.0 Ok",
        b"250 2.1.5 Ok",
        b"550 5.1.1 <nobody@example.com>: User unknown in local recipient table",
        b"250 2.1.5 Ok",
        b"250 2.1.5 Ok",
        b"354 End data with <CR><LF>.<CR><LF>",
        b"250 2.0.0 Ok: delivered",
        b"250 2.0.0 Ok: delivered",
        b"250 2.0.0 Ok: delivered",
        b"",
    ]
    joe = session.stores["maildir"].messages(f"{session.root}/example.com/joe/Maildir")
    # joe and joe+tag are one mailbox: one copy (each RCPT still got its own reply)
    assert joe == [b"Return-Path: <a@b.org>\nDelivered-To: joe@example.com\nSubject: x\n\nhello\n"]
    box = session.stores["mbox"].messages(f"{session.root}/example.com/box/mbox")
    assert box == [b"Return-Path: <a@b.org>\nDelivered-To: box@example.com\nSubject: x\n\nhello\n"]


def test_over_quota_fails_that_recipient_alone(session):
    body = b"Subject: big\r\n\r\n" + b"x" * 300 + b"\r\n.\r\n"
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<ann@example.com>\r\nDATA\r\n" + body)
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        b"250 2.0.0 Ok: delivered\r\n"
                        b"552 5.2.2 <ann@example.com>: Mailbox full: over quota\r\n")
    assert session.stores["maildir"].messages(f"{session.root}/example.com/ann/Maildir") == []


def test_alias_fans_out_and_one_failure_fails_the_recipient(session):
    body = b"Subject: big\r\n\r\n" + b"x" * 300 + b"\r\n.\r\n"
    out = run(session, b"LHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<team@example.com>\r\nDATA\r\n" + body)
    assert out.endswith(b"552 5.2.2 <team@example.com>: Mailbox full: over quota\r\n")


def test_alias_of_several_addresses_answers_expanded(session):
    """The courier turns this text into the notice's Action: expanded
    (RFC 3461 6.2.7.3); a single mailbox, plus-addressed or not, stays delivered."""
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<team@example.com>\r\n"
                       b"RCPT TO:<joe+tag@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        b"250 2.0.0 Ok: expanded to 2 recipients\r\n"
                        b"250 2.0.0 Ok: delivered\r\n")
    for user in ("joe", "ann"):
        assert len(session.stores["maildir"].messages(f"{session.root}/example.com/{user}/Maildir")) == 1


def test_disk_trouble_is_temporary_for_affected_recipients(session):
    session.stores["mbox"].fail_with = TempFail(Reply(452, "4.3.1", "Insufficient system storage for mailbox"))
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<box@example.com>\r\n"
                       b"RCPT TO:<joe@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert out.endswith(b"452 4.3.1 <box@example.com>: Insufficient system storage for mailbox\r\n"
                        b"250 2.0.0 Ok: delivered\r\n")


def test_store_exception_is_never_reported_as_delivered(session, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(session.stores["maildir"], "deliver", boom)
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert out.endswith(b"451 4.3.0 <joe@example.com>: Local delivery error: RuntimeError\r\n")


def test_delivered_to_loop(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<box@example.com>\r\nDATA\r\n"
                       b"Delivered-To: JOE@example.com\r\nSubject: x\r\n\r\nDelivered-To: box@example.com\r\n.\r\n")
    assert out.endswith(b"554 5.4.6 <joe@example.com>: Mail loop: already delivered to this mailbox\r\n"
                        b"250 2.0.0 Ok: delivered\r\n")


def test_foreign_domain_and_bare_postmaster(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.org>\r\n"
                       b"RCPT TO:<postmaster>\r\n")
    assert out.endswith(b"550 5.1.1 <joe@example.org>: User unknown in local recipient table\r\n"
                        b"250 2.1.5 Ok\r\n")


@pytest.mark.parametrize("addr, peer", [
    (IPv6Address("TCP", "::ffff:127.0.0.1", 40000), "127.0.0.1"),
    (IPv6Address("TCP", "::1", 40000), "::1"),
    (IPv4Address("TCP", "192.0.2.5", 40000), "192.0.2.5"),
    (UNIXAddress(b"/run/lmtp.sock"), "/run/lmtp.sock"),
    (None, "local"),
])
def test_peer_named_in_logs_as_the_smtp_listeners_name_it(tmp_path, addr, peer):
    """An IPv4 client of a dual-stack tcp6 LMTP listener is logged by its IPv4
    address, as on the SMTP and POP3 listeners (mailsys.policy.client_address)."""
    from twisted.logger import globalLogPublisher

    s = make_session(tmp_path, addr)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run(s, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<nobody@example.com>\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    qid = s.proto.txn.queue_id
    assert [e["text"] for e in events if "reject" in e.get("text", "")] == [
        f"{qid}: reject: RCPT from {peer}: 550 5.1.1 <nobody@example.com>: "
        f"User unknown in local recipient table"]


def test_notify_is_not_an_lmtp_parameter(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com> NOTIFY=NEVER\r\n")
    assert out.endswith(b"555 5.5.4 Unsupported option: NOTIFY\r\n")


def test_too_big_refused_for_every_recipient(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<box@example.com>\r\nDATA\r\n" + b"x" * 20000 + b"\r\n.\r\n")
    assert out.endswith(b"552 5.3.4 Error: message file too big\r\n" * 2)


def test_delivered_to_parser():
    # The MDA's messages have LF line ends (converted as they arrived).
    head = b"Delivered-To: <A@B.c>\nX: y\ndelivered-to:  d@e.f \n\nDelivered-To: no@x\n"
    assert delivered_to(head) == {"a@b.c", "d@e.f"}
    assert delivered_to(b"Subject: x\n\n") == set()
    assert delivered_to(b"Delivered-To: a@b.c") == {"a@b.c"}      # no body, no final LF


def test_size_limit_counts_crlf_bytes_as_before(session):
    """The body reaches the MDA with LF line ends, but SIZE and the limit still
    count the message as sent (CRLF): 10000 bytes pass, 10001 do not, although
    both are much smaller in LF."""
    sizes = []
    data_end = session.proto.handler.data_end
    session.proto.handler.data_end = lambda proto, txn, size: sizes.append(size) or data_end(proto, txn, size)
    exact = b"xx\r\n" * 2499 + b"..x\r\n"         # the stuffing dot is not counted
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
                       + exact + b".\r\n")
    assert out.endswith(b"250 2.0.0 Ok: delivered\r\n")
    assert sizes == [10000]
    over = b"xx\r\n" * 2499 + b"xxx\r\n"
    out = run(session, b"MAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n" + over + b".\r\n")
    assert out.endswith(b"552 5.3.4 Error: message file too big\r\n")
    assert sizes == [10000]
    (stored,) = session.stores["maildir"].messages(f"{session.root}/example.com/joe/Maildir")
    assert stored.endswith(b"\n" + b"xx\n" * 2499 + b".x\n") and b"\r" not in stored


def test_bare_newline_still_refused_for_every_recipient(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<box@example.com>\r\nDATA\r\nSubject: x\r\n\r\na\nb\r\n.\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        + b"550 5.5.2 Error: bare <CR> or <LF> in message; use <CR><LF> line endings\r\n" * 2)
    assert session.stores["maildir"].messages(f"{session.root}/example.com/joe/Maildir") == []


def test_messages_finishing_together_are_delivered_as_one_batch(tmp_path):
    """While one batch is being written, the next gathers: the stores then make
    several messages durable with one flush."""
    from mailsys.mda.lmtp import DeliveryBatcher

    calls = []
    store = MemoryStore()
    original = store.deliver_many
    store.deliver_many = lambda items: calls.append(len(items)) or original(items)
    held = []

    def run(f, *args):
        d = defer.Deferred()
        held.append((d, f, args))
        return d

    b = DeliveryBatcher(None, {"maildir": store}, run=run)
    target = [("joe@example.com", [("joe@example.com", "maildir", 0, "/m/joe")])]
    results = []
    for i in range(4):
        b.submit(target, b"Subject: %d\n\n" % i, "a@b.org").addCallback(results.append)
    assert len(held) == 1                # the first went at once, three wait
    d, f, args = held.pop()
    d.callback(f(*args))
    assert len(held) == 1                # the three waiting ones go together
    d, f, args = held.pop()
    d.callback(f(*args))
    assert calls == [1, 3]
    assert [[o.delivered for o in r] for r in results] == [[True]] * 4
    assert len(store.messages("/m/joe")) == 4


def test_alias_remote_targets_are_queued_not_dropped(tmp_path):
    """An alias that points outside our domains: the local copy is delivered, the
    remote one is spooled for the queue (ORCPT = the alias), and only when both are
    safe does the recipient get 250."""
    class RemoteAccounts(Accounts):
        def expand(self, address):
            if address.lower() == "ext@example.com":
                return Expansion(local_users=("joe@example.com",), remote=("someone@remote.example",))
            if address.lower() == "away@example.com":
                return Expansion(remote=("far@remote.example",))
            return super().expand(address)

    committed = []

    class Spool:
        def new_message(self):
            w = SimpleNamespace(data=[], queue_id="R1")
            w.write = w.data.append
            return w

        def commit(self, w, envelope):
            data = b"".join(w.data)
            committed.append((envelope, data))
            return defer.succeed(SimpleNamespace(queue_id="R1", message_size=len(data)))

    config = SimpleNamespace(mailbox=SimpleNamespace(root=str(tmp_path), default_store="maildir", quota=0),
                             domains=SimpleNamespace(local=("example.com",)))
    stores = {"maildir": MemoryStore(), "mbox": MemoryStore()}
    mda = MDA(config, RemoteAccounts(), reactor=None, stores=stores, run=defer.maybeDeferred, spool=Spool())
    limits = SimpleNamespace(message_size=10000, recipients=100, command_timeout=300,
                             data_timeout=600, auth_failures=3)
    proto = LMTPFactory(mda, limits, "mda.example.com", task.Clock()).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<ext@example.com>\r\n"
                       b"RCPT TO:<away@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert t.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                              b"250 2.0.0 Ok: expanded to 2 recipients\r\n"
                              b"250 2.0.0 Ok: queued as R1\r\n")
    ((envelope, message),) = committed
    assert envelope["sender"] == "a@b.org"
    assert envelope["recipients"] == [
        {"rcpt": "someone@remote.example", "state": "queued", "orcpt": ["rfc822", "ext@example.com"]},
        {"rcpt": "far@remote.example", "state": "queued", "orcpt": ["rfc822", "away@example.com"]}]
    assert message == b"Subject: x\r\n\r\nhi\r\n"
    assert stores["maildir"].messages(f"{tmp_path}/example.com/joe/Maildir") == [
        b"Return-Path: <a@b.org>\nDelivered-To: joe@example.com\nSubject: x\n\nhi\n"]


def test_repeated_rcpt_gets_its_own_reply_and_one_copy(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<joe@example.com>\r\nRCPT TO:<postmaster@example.com>\r\n"
                       b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n" + b"250 2.0.0 Ok: delivered\r\n" * 3)
    assert len(session.stores["maildir"].messages(f"{session.root}/example.com/joe/Maildir")) == 1


def test_refused_data_gets_one_reply_per_accepted_rcpt_even_repeated(session):
    out = run(session, b"LHLO x\r\nMAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\n"
                       b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + b"x" * 20000 + b"\r\n.\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        + b"552 5.3.4 Error: message file too big\r\n" * 2)


@pytest.mark.parametrize("lmtp, wants_lf, lf", [(True, True, True), (True, False, False),
                                                 (False, True, False)])
def test_lf_body_only_for_an_lmtp_handler_that_asks(lmtp, wants_lf, lf):
    """Only the MDA (LMTP, ``wants_lf``) gets LF chunks; an SMTP listener's body is
    untouched whatever its handler says.  The size is the CRLF one either way."""
    from tests.helpers import FakeHandler, connect

    handler = FakeHandler()
    handler.wants_lf = wants_lf
    proto, t, h, clock = connect(handler, lmtp=lmtp)
    hello = b"LHLO x\r\n" if lmtp else b"EHLO x\r\n"
    body = b"Subject: x\r\n\r\n..dot\r\nline\r\n"
    proto.dataReceived(hello + b"MAIL FROM:<a@b.org>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
                       + body + b".\r\n")
    crlf = body.replace(b"\r\n..", b"\r\n.")
    assert h.messages == [crlf.replace(b"\r\n", b"\n") if lf else crlf]
    assert ("data_end", len(crlf), ["joe@example.com"]) in h.calls


def test_the_mdas_limits_leave_room_for_what_the_queue_adds():
    """mailsys.tap gives every LMTP listener of the MDA the configured limits
    with SIZE_HEADROOM more message size, and nothing else changed."""
    import dataclasses

    from mailsys.config import LimitsConfig
    from mailsys.mda.lmtp import SIZE_HEADROOM, mda_limits

    limits = LimitsConfig(message_size=10000, recipients=1000, connections=1000,
                          connections_per_ip=50, command_timeout=300, data_timeout=600,
                          auth_failures=3)
    raised = mda_limits(limits)
    assert SIZE_HEADROOM == 1024 * 1024
    assert raised.message_size == 10000 + 1024 * 1024
    assert dataclasses.replace(raised, message_size=10000) == limits
