"""A real LMTP client: a stock Postfix delivers its virtual domain into our mailboxes.

Postfix (an alternate instance, harness.PostfixLMTPPeer) has
``virtual_mailbox_domains = example.com``, ``virtual_mailbox_maps`` listing our
accounts and ``virtual_transport = lmtp:inet:127.0.0.1:PORT`` (or
``lmtp:unix:SOCKET``) pointed at mailsys's LMTP listener.  Python's smtplib hands
mail to Postfix by SMTP; Postfix's lmtp client delivers it to us.

With several recipients in one LMTP transaction, one of them over its quota
(``mailsys user add tiny@example.com --quota 2000``), Postfix must bounce that
recipient alone (our ``552 5.2.2`` for it after DATA) and log ``status=sent`` for
the others; its bounce goes to the sender, a mailsys account, through the same
LMTP path.
"""
import email
import email.policy
import mailbox
import re
import smtplib
import time

import pytest

from tests.integration.harness import (LOOPBACK, PostfixLMTPPeer, maildir_files, maildir_of,
                                       mbox_of, mboxrd_unquote, start_mda, wait_for_files)

pytestmark = pytest.mark.integration

DOMAIN = "example.com"
MAILBOXES = ["joe@example.com", "ann@example.com", "box@example.com", "tiny@example.com",
             "bounces@example.com"]
SENDER = "bounces@example.com"


@pytest.fixture
def lmtp_peer(tmp_path):
    peers = []

    def make(lmtp):
        peer = PostfixLMTPPeer(tmp_path / f"postfix{len(peers)}", lmtp, [DOMAIN], MAILBOXES)
        peers.append(peer)
        return peer.start()

    yield make
    for peer in peers:
        peer.stop()


def message(marker, to, body=b"hello from postfix\r\n"):
    return (f"From: <{SENDER}>\r\nTo: {to}\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.org>\r\nDate: Thu, 26 Nov 2026 12:00:00 +0000\r\n"
            f"\r\n").encode() + body


def submit(peer, rcpts, msg):
    """SMTP to Postfix; returns Postfix's queue id."""
    with smtplib.SMTP(LOOPBACK, peer.port, local_hostname="client.example.org", timeout=30) as s:
        s.ehlo("client.example.org")
        code, _ = s.mail(SENDER)
        assert code == 250
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = s.data(msg)
        assert code == 250, text
    m = re.search(rb"queued as ([0-9A-Za-z]+)", text)
    assert m, text
    return m.group(1).decode()


def split_stored(data, account):
    """(our two delivery header lines, Postfix's Received field, the rest) of an LF message."""
    ours = f"Return-Path: <{SENDER}>\nDelivered-To: {account}\n".encode()
    assert data.startswith(ours), data[:300]
    rest = data[len(ours):]
    m = re.match(rb"Received: [^\n]*\n(?:[ \t][^\n]*\n)*", rest)
    assert m, rest[:300]
    return ours, m.group(0), rest[m.end():]


def wait_log(peer, pattern, count, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        lines = peer.log_lines(pattern)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_postfix_delivers_over_lmtp_and_bounces_the_over_quota_recipient_alone(make_server, lmtp_peer):
    server = start_mda(make_server, unix=False, tcp=True)
    peer = lmtp_peer(f"inet:{LOOPBACK}:{server.lmtp_port}")
    relay = re.escape(f"relay={LOOPBACK}[{LOOPBACK}]:{server.lmtp_port}")

    # 1. One message each for three of our users (two Maildir, one mbox).
    sent = {}
    for user in ("joe@example.com", "ann@example.com", "box@example.com"):
        marker = f"via-postfix-{user.split('@')[0]}"
        msg = message(marker, f"<{user}>")
        sent[user] = (marker, msg, submit(peer, [user], msg))
    for user in ("joe@example.com", "ann@example.com"):
        (data,) = wait_for_files(maildir_of(server, user), 1, timeout=60).values()
        _, received, rest = split_stored(data, user)
        assert re.match(rb"Received: from client\.example\.org \([a-z]+ \[127\.0\.0\.1\]\)\n", received), \
            received
        assert f"by {peer.HOSTNAME} (Postfix)".encode() in received
        assert f"for <{user}>".encode() in received
        assert rest == sent[user][1].replace(b"\r\n", b"\n")
    deadline = time.monotonic() + 60
    while not mbox_of(server, "box@example.com").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert len(mb) == 1
    _, _, rest = split_stored(mboxrd_unquote(mb.get_bytes(0)), "box@example.com")
    assert rest == sent["box@example.com"][1].replace(b"\r\n", b"\n")
    for user, (_, _, qid) in sent.items():
        lines = wait_log(peer, rf"{qid}: to=<{re.escape(user)}>, {relay}, .*status=sent", 1)
        assert len(lines) == 1, peer.log_text()[-3000:]
        assert "dsn=2.0.0" in lines[0] and "250 2.0.0 " in lines[0], lines
    assert maildir_files(maildir_of(server, "tiny@example.com")) == {}

    # 2. Four recipients in one message, tiny@example.com (quota 2000) cannot take it.
    rcpts = ["joe@example.com", "tiny@example.com", "ann@example.com", "box@example.com"]
    big = message("via-postfix-quota", "joe, tiny, ann, box", (b"q" * 60 + b"\r\n") * 50)
    qid = submit(peer, rcpts, big)
    bounced = wait_log(peer, rf"{qid}: to=<tiny@example\.com>, {relay}, .*status=bounced", 1)
    assert len(bounced) == 1, peer.log_text()[-3000:]
    assert "dsn=5.2.2" in bounced[0] and "552 5.2.2 " in bounced[0], bounced
    for user in ("joe@example.com", "ann@example.com", "box@example.com"):
        lines = wait_log(peer, rf"{qid}: to=<{re.escape(user)}>, {relay}, .*status=sent", 1)
        assert len(lines) == 1 and "dsn=2.0.0" in lines[0], (user, peer.log_text()[-3000:])
    per_rcpt = peer.log_lines(rf"{qid}: to=<")
    assert len(per_rcpt) == 4, per_rcpt           # one final status each, no deferral
    assert not peer.log_lines(rf"{qid}: to=<.*status=deferred")

    for user in ("joe@example.com", "ann@example.com"):
        files = wait_for_files(maildir_of(server, user), 2, timeout=60)
        assert sum(1 for d in files.values() if b"\nSubject: via-postfix-quota\n" in d) == 1
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert len(mb) == 2 and b"\nSubject: via-postfix-quota\n" in mb.get_bytes(1)
    assert maildir_files(maildir_of(server, "tiny@example.com")) == {}

    # 3. The bounce reaches the sender (a mailsys account) over the same LMTP path
    #    and names tiny alone.
    (data,) = wait_for_files(maildir_of(server, SENDER), 1, timeout=60).values()
    assert data.startswith(b"Return-Path: <>\nDelivered-To: bounces@example.com\n"), data[:200]
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(status) == 1
    text = status[0].as_string()
    assert re.findall(r"(?mi)^Final-Recipient: rfc822; ?(\S+)", text) == ["tiny@example.com"]
    assert re.search(r"(?mi)^Status: 5\.2\.2", text)
    assert re.search(r"(?mi)^Diagnostic-Code: smtp; 552 5\.2\.2 ", text)
    server.wait_for_log(r"to=<tiny@example\.com>, relay=local, .*dsn=5\.2\.2, status=bounced")


def test_postfix_delivers_over_the_unix_socket(make_server, lmtp_peer):
    """``virtual_transport = lmtp:unix:PATH`` (what docs/mda.rst recommends) works as
    well: Postfix's lmtp client runs as the ``postfix`` user, so the socket must be
    reachable and writable for it: ``mode=666`` (mailsys makes it 0600 otherwise)."""
    server = start_mda(make_server, unix_mode="666")
    peer = lmtp_peer(f"unix:{server.lmtp_socket}")
    msg = message("via-postfix-unix", "<joe@example.com>")
    qid = submit(peer, ["joe@example.com"], msg)
    lines = wait_log(peer, rf"{qid}: to=<joe@example\.com>, .*status=(sent|bounced|deferred)", 1)
    assert len(lines) == 1 and "status=sent" in lines[0], peer.log_text()[-3000:]
    (data,) = wait_for_files(maildir_of(server, "joe@example.com"), 1, timeout=60).values()
    _, _, rest = split_stored(data, "joe@example.com")
    assert rest == msg.replace(b"\r\n", b"\n")
