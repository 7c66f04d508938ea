"""A real mailbox reader: Dovecot serves over IMAP the Maildir our LMTP wrote.

Three messages go through mailsys's LMTP listener into joe's Maildir under
``mailbox.root``: one with an 8-bit UTF-8 body, one with ``From `` body lines
(and a leading-dot line), one over 100 KB.  Then a stock Dovecot (an alternate
instance under the test's directory: ``mail_location =
maildir:ROOT/%d/%n/Maildir``, passdb static, IMAP on a free loopback port,
``ssl = no``) opens the same tree, and imaplib fetches every message: ``BODY[]``
must be exactly what we accepted plus our ``Return-Path`` and ``Delivered-To``
lines, with the CRLF line ends IMAP uses, and ``RFC822.SIZE`` must equal the
``W=`` of the file name (Dovecot takes it from there without reading the file,
so a wrong ``W=`` shows up as a wrong size).  Dovecot must log no error or
warning about our files (it complains, for one, about a wrong ``S=``).
"""
import re

import pytest

from tests.integration.harness import (MAILDIR_NAME, DovecotPeer, LMTPClient, maildir_files,
                                       maildir_of, start_mda, stored_form)

pytestmark = pytest.mark.integration

SENDER = "sender@example.org"


def messages():
    utf8 = ("From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.org>\r\nTo: <joe@example.com>\r\n"
            "Subject: dovecot-utf8\r\nMessage-ID: <dovecot-utf8@example.org>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            "Grüße aus Köln – ☃ 雪だるま – Ελληνικά\r\nZweite Zeile: äöüß\r\n").encode("utf-8")
    from_lines = (b"From: <sender@example.org>\r\nTo: <joe@example.com>\r\n"
                  b"Subject: dovecot-from-lines\r\nMessage-ID: <dovecot-from@example.org>\r\n\r\n"
                  b"From the first body line\r\n>From a quoted one\r\n.a leading dot\r\n"
                  b"From the last line\r\n")
    line = b"0123456789 The quick brown fox jumps over the lazy dog. From here on.\r\n"
    big = (b"From: <sender@example.org>\r\nTo: <joe@example.com>\r\n"
           b"Subject: dovecot-big\r\nMessage-ID: <dovecot-big@example.org>\r\n\r\n"
           + line * (150_000 // len(line)))
    assert len(big) > 100_000
    return {"dovecot-utf8": utf8, "dovecot-from-lines": from_lines, "dovecot-big": big}


def fetch_all(client):
    """{Subject: (RFC822.SIZE, BODY[] bytes)} of every message in the selected mailbox."""
    typ, data = client.fetch("1:*", "(RFC822.SIZE BODY.PEEK[])")
    assert typ == "OK", data
    out = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        head, body = item
        m = re.search(rb"RFC822\.SIZE (\d+)", head)
        assert m, head
        subject = re.search(rb"(?m)^Subject: (\S+)\r$", body).group(1).decode()
        out[subject] = (int(m.group(1)), body)
    return out


def test_dovecot_serves_exactly_what_we_delivered(make_server, tmp_path):
    server = start_mda(make_server)
    sent = messages()
    client = LMTPClient(server.lmtp_socket)
    try:
        for marker, msg in sent.items():
            _, rcpt, after = client.transaction(SENDER, ["joe@example.com"], msg)
            assert rcpt == ["250 2.1.5 Ok"] and len(after) == 1 and after[0].startswith("250 2.0.0 "), \
                (marker, rcpt, after)
    finally:
        client.quit()
    maildir = maildir_of(server, "joe@example.com")
    files = maildir_files(maildir)
    assert len(files) == 3
    vsize = {}
    for name, data in files.items():
        subject = re.search(rb"(?m)^Subject: (\S+)$", data).group(1).decode()
        assert data == stored_form(SENDER, "joe@example.com", sent[subject])   # LF on disk
        m = MAILDIR_NAME.match(name)
        assert m and int(m["size"]) == len(data), name
        vsize[subject] = int(m["vsize"])

    dovecot = DovecotPeer(tmp_path / "dovecot", server.mail_root)
    dovecot.start()
    try:
        imap = dovecot.imap("joe@example.com")
        try:
            typ, data = imap.select("INBOX")
            assert typ == "OK" and data == [b"3"], data
            got = fetch_all(imap)
        finally:
            imap.logout()
        log = dovecot.log_text()
    finally:
        dovecot.stop()

    assert set(got) == set(sent)
    for subject, msg in sent.items():
        size, body = got[subject]
        expected = stored_form(SENDER, "joe@example.com", msg).replace(b"\n", b"\r\n")
        assert body == expected, subject
        assert size == len(expected) == vsize[subject], (subject, size, len(expected), vsize[subject])
    problems = [line for line in log.splitlines()
                if re.search(r"\b(Error|Panic|Fatal|Warning):", line)]
    assert problems == [], "\n".join(problems)
