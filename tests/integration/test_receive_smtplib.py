"""A real ``twistd -n mailsys`` on loopback, spoken to with Python's smtplib.

Every test reads back what the server wrote: the replies on the wire, the spool
through ``mailsys.spool.read_spool`` and the log lines.
"""
import re

import pytest

from tests.integration.harness import HOSTNAME, padded, split_received

pytestmark = pytest.mark.integration

QUEUED = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\Z")
RECEIVED = (r"Received: from {helo} \(localhost \[127\.0\.0\.1\]\)\r\n"
            r"\tby {host} \(mailsys\) with ESMTP id {qid}\r\n"
            r"\tfor <{rcpt}>; [A-Z][a-z]{{2}}, [ 0-9]{{1,2}} [A-Z][a-z]{{2}} \d{{4}} "
            r"\d\d:\d\d:\d\d [-+]\d{{4}}\r\n\Z")


def message(subject, body=b"Hello Joe.\r\n", sender=b"alice@example.org", to=b"joe@example.com"):
    return (b"From: <" + sender + b">\r\nTo: <" + to + b">\r\nSubject: " + subject.encode() +
            b"\r\nMessage-ID: <" + subject.encode() + b"@client.example.org>\r\n\r\n" + body)


def queued_id(reply):
    code, text = reply
    assert code == 250, reply
    m = QUEUED.match(text)
    assert m, reply
    return m.group(1).decode()


def test_banner_and_ehlo(server):
    client = server.smtp()
    try:
        assert client.docmd("NOOP") == (250, b"2.0.0 Ok")
        code, text = client.ehlo("client.example.org")
    finally:
        client.quit()
    assert code == 250
    lines = text.decode().split("\n")
    assert lines[0] == HOSTNAME
    assert sorted(lines[1:]) == sorted(["PIPELINING", "SIZE 26214400", "ENHANCEDSTATUSCODES",
                                        "8BITMIME", "SMTPUTF8", "DSN", "ETRN", "HELP"])
    # No certificate configured: no STARTTLS; the mta role never offers AUTH.


def test_banner_names_host(server):
    import smtplib

    client = smtplib.SMTP(timeout=30)
    try:
        assert client.connect("127.0.0.1", server.port) == (220, f"{HOSTNAME} ESMTP".encode())
    finally:
        client.close()


def test_local_user_is_queued_exactly(server):
    # A line starting with a dot travels dot-stuffed and must come back unstuffed;
    # 8-bit text travels under BODY=8BITMIME.
    body = (b"First line.\r\n.leading dot\r\n..two dots\r\n\r\n"
            b"caf\xc3\xa9 \xe2\x82\xac\r\nlast line without anything after\r\n")
    msg = message("queued-exactly", body)
    client = server.smtp()
    try:
        assert client.mail("alice@example.org", ["BODY=8BITMIME"]) == (250, b"2.1.0 Ok")
        assert client.rcpt("joe@example.com") == (250, b"2.1.5 Ok")
        qid = queued_id(client.data(msg))
        assert client.quit() == (221, b"2.0.0 Bye")
    finally:
        client.close()

    entries = server.spool()
    assert [e.queue_id for e in entries] == [qid]
    entry = entries[0]
    stored = entry.read_message()
    received, rest = split_received(stored)
    assert re.match(RECEIVED.format(helo=r"client\.example\.org", host=re.escape(HOSTNAME),
                                    qid=qid, rcpt=r"joe@example\.com"), received.decode()), received
    assert rest == msg
    env = entry.envelope
    assert env["id"] == qid
    assert env["sender"] == "alice@example.org"
    assert env["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"}]
    assert env["params"] == {"body": "8BITMIME"}
    assert env["size"] == len(stored) == entry.message_size
    assert env["client"] == {"ip": "127.0.0.1", "name": "localhost", "helo": "client.example.org",
                             "proto": "ESMTP", "role": "mta", "auth": None}


def test_two_recipients_one_copy(server):
    msg = message("two-recipients")
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        assert client.rcpt("joe@example.com") == (250, b"2.1.5 Ok")
        assert client.rcpt("bob@example.net") == (250, b"2.1.5 Ok")
        qid = queued_id(client.data(msg))
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"},
                                            {"rcpt": "bob@example.net", "state": "queued"}]
    received, rest = split_received(entry.read_message())
    assert rest == msg
    assert b"\tfor <" not in received   # several recipients: none is named


def test_unknown_local_user_refused(server):
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        code, text = client.rcpt("nobody@example.com")
        assert (code, text[:6]) == (550, b"5.1.1 "), (code, text)
        assert b"<nobody@example.com>" in text
        # Same answer for the other local domain, and for a user of the wrong domain.
        code, text = client.rcpt("joe@example.net")
        assert (code, text[:6]) == (550, b"5.1.1 "), (code, text)
        code, text = client.docmd("DATA")
        assert (code, text[:6]) == (554, b"5.5.1 "), (code, text)
        assert client.rset() == (250, b"2.0.0 Ok")
    finally:
        client.quit()
    assert server.spool() == []
    assert re.search(r"reject: RCPT from localhost\[127\.0\.0\.1\]: 550 5\.1\.1 <nobody@example\.com>",
                     server.log_text())


def test_relay_denied_without_mynetworks(make_server):
    server = make_server({"relay": {"mynetworks": []}})
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        code, text = client.rcpt("someone@elsewhere.example.org")
        assert (code, text) == (554, b"5.7.1 <someone@elsewhere.example.org>: Relay access denied")
        # Mail for our own users is still taken from the same client.
        assert client.rcpt("joe@example.com") == (250, b"2.1.5 Ok")
        qid = queued_id(client.data(message("local-while-no-relay")))
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"}]


def test_relay_allowed_from_default_mynetworks(server):
    msg = message("relayed", to=b"someone@elsewhere.example.org")
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        assert client.rcpt("someone@elsewhere.example.org") == (250, b"2.1.5 Ok")
        qid = queued_id(client.data(msg))
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["recipients"] == [{"rcpt": "someone@elsewhere.example.org",
                                             "state": "queued"}]
    assert split_received(entry.read_message())[1] == msg


def test_postmaster_always_accepted(make_server):
    # No mynetworks: acceptance cannot come from relay permission.  No postmaster
    # alias either: RFC 5321 4.5.1 wants postmaster accepted regardless.
    server = make_server({"relay": {"mynetworks": []}})
    client = server.smtp()
    try:
        assert client.mail("") == (250, b"2.1.0 Ok")      # the null sender
        assert client.rcpt("postmaster") == (250, b"2.1.5 Ok")
        assert client.rcpt("postmaster@example.com") == (250, b"2.1.5 Ok")
        assert client.rcpt("PostMaster@example.net") == (250, b"2.1.5 Ok")
        code, text = client.rcpt("postmaster@elsewhere.example.org")
        assert (code, text[:6]) == (554, b"5.7.1 "), (code, text)
        qid = queued_id(client.data(message("to-postmaster", to=b"postmaster")))
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["sender"] == ""
    assert [r["rcpt"] for r in entry.envelope["recipients"]] == [
        "postmaster", "postmaster@example.com", "PostMaster@example.net"]


def test_message_size_limit(make_server):
    limit = 10000
    server = make_server({"limits": {"message_size": limit}})

    def sized(n, subject):
        return padded(message(subject, b""), n)

    client = server.smtp()
    try:
        assert b"SIZE 10000" in client.ehlo_resp
        # Declared too big: refused at MAIL.
        code, text = client.mail("alice@example.org", [f"SIZE={limit + 1}"])
        assert (code, text[:6]) == (552, b"5.3.4 "), (code, text)
        # Not declared, but too big: read to its end, then 552 5.3.4.
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        code, text = client.data(sized(2 * limit, "too-big"))
        assert (code, text) == (552, b"5.3.4 Error: message file too big")
        # One byte over: refused; exactly the limit: taken.  The same connection goes on.
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        code, text = client.data(sized(limit + 1, "one-over"))
        assert (code, text[:6]) == (552, b"5.3.4 "), (code, text)
        client.mail("alice@example.org", [f"SIZE={limit}"])
        client.rcpt("joe@example.com")
        exact = sized(limit, "exactly-the-limit")
        qid = queued_id(client.data(exact))
        assert client.quit() == (221, b"2.0.0 Bye")
    finally:
        client.close()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert split_received(entry.read_message())[1] == exact


def test_vrfy_and_expn(server):
    client = server.smtp()
    try:
        known = client.verify("joe@example.com")
        unknown = client.verify("nobody@example.com")
        assert known[0] == 252 and known[1].startswith(b"2.0.0 "), known
        assert unknown == known     # VRFY never tells whether a user exists
        code, text = client.expn("staff")
        assert (code, text[:6]) == (502, b"5.5.1 "), (code, text)
    finally:
        client.quit()


def test_dsn_parameters_kept(server):
    client = server.smtp()
    try:
        assert client.mail("alice@example.org", ["RET=HDRS", "ENVID=abc"]) == (250, b"2.1.0 Ok")
        assert client.rcpt("joe@example.com", ["NOTIFY=SUCCESS,FAILURE",
                                               "ORCPT=rfc822;x@y"]) == (250, b"2.1.5 Ok")
        assert client.rcpt("bob@example.net", ["NOTIFY=NEVER"]) == (250, b"2.1.5 Ok")
        qid = queued_id(client.data(message("dsn")))
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["params"] == {"ret": "HDRS", "envid": "abc"}
    assert entry.envelope["recipients"] == [
        {"rcpt": "joe@example.com", "state": "queued", "notify": ["SUCCESS", "FAILURE"],
         "orcpt": ["rfc822", "x@y"]},
        {"rcpt": "bob@example.net", "state": "queued", "notify": ["NEVER"]},
    ]


def test_log_lines(server):
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        msg = message("logged")
        qid = queued_id(client.data(msg))
        client.quit()
    finally:
        client.close()
    size = len(server.spool()[0].read_message())
    # CONTRACT section 6 to the letter: "QUEUEID: from=<...>, size=N, nrcpt=N (queued)",
    # the client on a line of its own before it, as Postfix's smtpd logs it.
    queued = server.wait_for_log(
        rf"^\S+ \[mailsys\.smtpd#info\] {qid}: from=<alice@example\.org>, size={size}, "
        rf"nrcpt=1 \(queued\)$")
    server.wait_for_log(r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=1 data=1 quit=1$")
    lines = server.log_text().splitlines()
    smtpd = [line.split("] ", 1)[1] for line in lines if "[mailsys.smtpd#" in line]
    at = smtpd.index(queued.group(0).split("] ", 1)[1])
    # Around our queue id: the connect of our session and its client line before it,
    # its disconnect after it.
    assert smtpd[at - 2] == "connect from localhost[127.0.0.1]"
    assert smtpd[at - 1] == f"{qid}: client=localhost[127.0.0.1]"
    assert smtpd[at + 1] == "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1"
    assert sum(qid in line for line in lines if "[mailsys.smtpd#" in line) == 2
    # ... and the queue took it over at once (no LMTP listener in this test set-up).
    server.wait_for_log(rf"\[mailsys\.queue#info\] {qid}: to=<joe@example\.com>, relay=lmtp, "
                        rf"delay=[0-9.]+, dsn=4\.3\.5, status=deferred \(No LMTP listener")


def test_mail_loop_refused(server):
    hops = b"".join(b"Received: from hop%d.example.org by hop%d.example.org; "
                    b"Fri, 27 Nov 2026 12:00:00 +0000\r\n" % (i, i + 1) for i in range(60))
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        code, text = client.data(hops + message("looping"))
        assert (code, text[:6]) == (554, b"5.4.6 "), (code, text)
        # The connection stays usable and a normal message still goes through.
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        qid = queued_id(client.data(message("after-the-loop")))
    finally:
        client.quit()
    assert [e.queue_id for e in server.spool()] == [qid]


def test_leading_dot_is_always_removed(server):
    """RFC 5321 4.5.2: a line that starts with a period and has more characters loses
    that first period, whether the client stuffed it ("..x") or not (".x")."""
    sent = (b"Subject: dots\r\n\r\n"
            b"..stuffed\r\n"
            b".unstuffed\r\n"
            b"...\r\n"
            b". space\r\n"
            b"end\r\n")
    client = server.smtp()
    try:
        client.mail("alice@example.org")
        client.rcpt("joe@example.com")
        assert client.docmd("DATA")[0] == 354
        client.send(sent + b".\r\n")    # raw: smtplib would stuff every leading dot
        qid = queued_id(client.getreply())
    finally:
        client.quit()
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert split_received(entry.read_message())[1] == (b"Subject: dots\r\n\r\n"
                                                       b".stuffed\r\n"
                                                       b"unstuffed\r\n"
                                                       b"..\r\n"
                                                       b" space\r\n"
                                                       b"end\r\n")
