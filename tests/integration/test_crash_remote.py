"""kill -9 of a real ``twistd -n mailsys`` while its queue relays mail to a real
Postfix found by MX lookup on a loopback DNS server.

Every message the sender acknowledged with 250 must reach Postfix's mailbox after
the restarts, and a message may arrive twice only if a kill fell between the
peer's 250 and the journal record of it (the window every MTA has; RFC 5321
section 6.1 prefers a duplicate to a loss): at most one extra copy per message a
session had in flight at a kill, so at most :data:`MAX_SESSIONS` copies a kill.
"""
import collections
import os
import random
import re
import smtplib
import time

import pytest

from mailsys.couriers.remote import MAX_SESSIONS
from tests.integration.dnsserver import DNSServer, zone
from tests.integration.harness import LOOPBACK, PostfixMXPeer, maildir_files
from tests.integration.test_crash_delivery import queue_drained

pytestmark = pytest.mark.integration

MESSAGES = 600
KILLS = 3
RCPT = "rcpt@remote.test"
TAG = re.compile(rb"(?m)^Subject: relay-(\d+)$")


def test_kill9_while_relaying_delivers_every_acknowledged_message(tmp_path, make_server):
    peer = PostfixMXPeer(tmp_path / "postfixmx", ["remote.test"], [RCPT])
    dns = DNSServer(tmp_path / "dns", zone(["remote.test. IN MX 10 mx.remote.test.",
                                            "mx.remote.test. IN A 127.0.0.1"])).start()
    try:
        server = make_server({
            "dns": {"nameservers": [dns.nameserver], "timeout": 2},
            "relay": {"transport": {"remote.test": f"smtp:remote.test:{peer.port}"}},
            "queue": {"retry_min": 1, "retry_max": 2},
            "server": {"workers": 2}})
        load_then_release(server, peer, "sender@client.test", RCPT, MESSAGES, "a relayed message")
        maildir = peer.maildir(RCPT)
        seed, kills = kill_while_arriving(server, maildir, MESSAGES, "at the peer")
        # Postfix may still be writing the last ones into the mailbox.
        deadline = time.monotonic() + 60
        copies = tally(maildir)
        while set(copies) != set(range(1, MESSAGES + 1)) and time.monotonic() < deadline:
            time.sleep(0.25)
            copies = tally(maildir)
    finally:
        dns.stop()
        peer.stop()
    missing = sorted(set(range(1, MESSAGES + 1)) - set(copies))
    extra = sum(c - 1 for c in copies.values())
    print(f"seed {seed}: kills with {kills} messages at the peer; {extra} duplicates")
    assert not missing, f"seed {seed}: acknowledged messages never delivered: {missing[:20]}"
    assert set(copies) == set(range(1, MESSAGES + 1)), f"seed {seed}: stray messages"
    assert extra <= KILLS * MAX_SESSIONS, f"seed {seed}: {extra} duplicates after {KILLS} kills"
    log = server.log_text()
    assert "Traceback" not in log
    assert len(re.findall(r"to=<rcpt@remote\.test>, relay=mx\.remote\.test\[127\.0\.0\.1\]:"
                          rf"{peer.port}, delay=[\d.]+, dsn=2\.0\.0, status=sent", log)) \
        >= MESSAGES
    assert "status=bounced" not in log


def load_then_release(server, peer, sender, rcpt, n, text):
    """Give the sender ``n`` messages while the peer is down (the mta port relays
    for 127.0.0.1, relay.mynetworks' default), then start the peer and flush: the
    relaying, which would otherwise keep pace with the submissions, all comes
    after, where the kills land."""
    with smtplib.SMTP(LOOPBACK, server.port, local_hostname="client.test", timeout=60) as c:
        for i in range(1, n + 1):
            message = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: relay-{i}\r\n"
                       f"Message-ID: <relay-{i}@client.test>\r\n\r\n"
                       + f"line {i} of {text}\r\n" * 40).encode()
            assert c.sendmail(sender, [rcpt], message) == {}
    peer.start()
    flushed = server.mailsys_cli("queue", "flush")
    assert flushed.returncode == 0, flushed.stderr


def kill_while_arriving(server, maildir, total, what):
    """kill -9 and restart the sender :data:`KILLS` times at random points while
    ``maildir`` fills up, then wait until its queue is empty and stop it.
    Returns the seed and how many files were there at each kill."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kills = []
    for k in range(KILLS):
        target = (k + 1) * total // (KILLS + 2) + rng.randrange(total // 10)
        deadline = time.monotonic() + 120
        while count(maildir) < target:
            assert time.monotonic() < deadline, (
                f"seed {seed}: only {count(maildir)} of {total} {what} after 120 s")
            time.sleep(0.002)
        time.sleep(rng.random() * 0.02)
        server.kill9()
        kills.append(count(maildir))
        time.sleep(rng.random() * 0.5)
        server.start()
    deadline = time.monotonic() + 180
    while not queue_drained(server):
        assert time.monotonic() < deadline, f"seed {seed}: the queue did not drain in 180 s"
        time.sleep(0.25)
    server.stop()
    return seed, kills


def count(maildir):
    try:
        return len(os.listdir(maildir / "new"))
    except FileNotFoundError:
        return 0


def tally(maildir):
    copies = collections.Counter()
    for data in maildir_files(maildir, "new").values():
        m = TAG.search(data)
        assert m, data[:300]
        copies[int(m.group(1))] += 1
    return copies


BOUNCES = 300


def test_kill9_while_bouncing_returns_every_report(tmp_path, make_server):
    """Mail the peer refuses for good (Postfix: 550 5.1.1, no such mailbox) comes
    back to the local sender as an RFC 3464 report, spooled like any message and
    journaled as reported (mailsys.queue).  Killed three times while the reports
    go out: every refused message is reported, and a report is sent twice only
    when a kill fell between its spooling and that journal record, which holds
    at most the queue's active messages (100)."""
    from tests.integration.test_remote_delivery import sender_host

    peer = PostfixMXPeer(tmp_path / "postfixmx", ["remote.test"], [RCPT])
    dns = DNSServer(tmp_path / "dns", zone(["remote.test. IN MX 10 mx.remote.test.",
                                            "mx.remote.test. IN A 127.0.0.1"])).start()
    try:
        server = sender_host(make_server, dns, {"remote.test": f"smtp:remote.test:{peer.port}"},
                             server={"workers": 2})
        server.start()
        load_then_release(server, peer, "joe@example.com", "nobody@remote.test", BOUNCES,
                          "a message nobody takes")
        maildir = server.mail_root / "example.com" / "joe" / "Maildir"
        seed, kills = kill_while_arriving(server, maildir, BOUNCES, "reports")
    finally:
        dns.stop()
        peer.stop()
    copies = tally(maildir)
    missing = sorted(set(range(1, BOUNCES + 1)) - set(copies))
    extra = sum(c - 1 for c in copies.values())
    print(f"seed {seed}: kills with {kills} reports delivered; {extra} duplicates")
    assert not missing, f"seed {seed}: refused messages never reported: {missing[:20]}"
    assert set(copies) == set(range(1, BOUNCES + 1)), f"seed {seed}: stray messages"
    assert max(copies.values()) <= 1 + KILLS and extra <= KILLS * 100, (
        f"seed {seed}: {extra} duplicated reports after {KILLS} kills")
    for data in maildir_files(maildir, "new").values():
        assert b"Content-Type: multipart/report; report-type=delivery-status;" in data
        assert b"Final-Recipient: rfc822; nobody@remote.test" in data
        assert b"Status: 5.1.1" in data
    assert "Traceback" not in server.log_text()
