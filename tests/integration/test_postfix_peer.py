"""A real Postfix relays to mailsys: "receive relayed mail from ISPs" (issue 2).

The ISP is a stock Postfix, an alternate instance on loopback whose relayhost is
our mta port.  A message handed to Postfix by SMTP must come out of our spool with
Postfix's Received header under ours and everything else byte for byte.
"""
import re
import smtplib

import pytest

from tests.integration.harness import HOSTNAME, PostfixPeer, received_fields, split_received

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: Joe <joe@example.com>\r\n"
           b"Subject: via the ISP\r\n"
           b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
           b"Message-ID: <postfix-peer-1@client.example.org>\r\n"
           b"\r\n"
           b"Relayed by Postfix.\r\n"
           b".A line that starts with a dot.\r\n"
           b"The end.\r\n")


def test_postfix_relays_to_mailsys(server, postfix_peer):
    peer = postfix_peer(f"[127.0.0.1]:{server.port}")

    with smtplib.SMTP("127.0.0.1", peer.port, local_hostname="client.example.org",
                      timeout=30) as client:
        client.ehlo("client.example.org")
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("joe@example.com")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, (code, text)
        m = re.match(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\Z", text)
        assert m, text
        postfix_id = m.group(1).decode()

    (entry,) = server.wait_for_spool(1)
    qid = entry.queue_id

    # Postfix says it handed the message over, naming our queue id.
    peer.wait_for_log(
        rf"{postfix_id}: to=<joe@example\.com>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{server.port}, "
        rf".*dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as {qid}\)")

    env = entry.envelope
    assert env["sender"] == "alice@example.org"
    assert [(r["rcpt"], r["state"]) for r in env["recipients"]] == [("joe@example.com", "queued")]
    assert env["client"]["helo"] == PostfixPeer.HOSTNAME
    assert env["client"]["ip"] == "127.0.0.1"
    assert env["client"]["proto"] == "ESMTP"

    stored = entry.read_message()
    ours, after_ours = split_received(stored)
    assert ours.startswith(f"Received: from {PostfixPeer.HOSTNAME} (localhost [127.0.0.1])\r\n"
                           f"\tby {HOSTNAME} (mailsys) with ESMTP id {qid}\r\n"
                           f"\tfor <joe@example.com>; ".encode()), ours
    theirs, rest = split_received(after_ours)
    fields = received_fields(stored)
    assert len(fields) == 2, fields
    assert re.match(rf"Received: from client\.example\.org \(\S+ \[127\.0\.0\.1\]\) "
                    rf"by {re.escape(PostfixPeer.HOSTNAME)} \(Postfix\) with ESMTP id {postfix_id} "
                    rf"for <joe@example\.com>; ", fields[1]), fields[1]
    # Postfix passes every header and the body on unchanged (the dot line included).
    assert rest == MESSAGE
