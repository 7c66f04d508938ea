"""The MDA's LMTP listener (issue 4) with real clients: swaks, smtp-source, raw sockets.

Accounts are made by the real CLI (``mailsys user add ... --password-stdin``, with
``--store mbox`` and ``--quota``); see ``MDA_ACCOUNTS`` in harness.py:
joe and ann (Maildir), box (mbox), tiny (Maildir, quota 2000 bytes), bounces.

What a store must hold for a message is exactly the bytes the client sent (dot
lines unstuffed) with ``Return-Path: <sender>`` and ``Delivered-To: <account>`` in
front and every line end LF; mbox adds the ``From `` line, mboxrd quoting and a
blank line.  Python's ``mailbox`` module is the independent reader.
"""
import collections
import mailbox
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import (MAILDIR_NAME, LMTPClient, find_program, lmtp_deliver,
                                       maildir_files, maildir_of, mbox_of, mboxrd_unquote,
                                       start_mda, stored_form)

pytestmark = pytest.mark.integration

ASCTIME = rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) " \
          rb"[ 1-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9] [0-9]{4}"
DELIVERED = re.compile(r"^250 2\.0\.0 ")


def program(name):
    found = find_program(name)
    if found is None:
        pytest.fail(f"{name} is not installed; the integration tests need it "
                    f"(`bash .ci/test-all` installs it)")
    return found


def mboxrd_quote(data):
    return re.sub(rb"(?m)^(>*From )", rb">\1", data)


def mbox_record(sender, stored):
    """The regex an mbox holding exactly one message ``stored`` must match in full."""
    return re.compile(b"From " + re.escape(sender.encode()) + b" " + ASCTIME + b"\n"
                      + re.escape(mboxrd_quote(stored)) + b"\n", re.S)


def message(marker, body=b"hello\r\n", extra=b""):
    return (f"From: <sender@example.org>\r\nTo: <joe@example.com>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.org>\r\n").encode() + extra + b"\r\n" + body


def only_file(maildir):
    files = maildir_files(maildir)
    assert len(files) == 1, sorted(files)
    (name, data), = files.items()
    return name, data


def check_maildir_name(name, data):
    m = MAILDIR_NAME.match(name)
    assert m, f"{name!r} is not <sec>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<crlf size>"
    assert int(m["size"]) == len(data), name
    assert int(m["vsize"]) == len(data) + data.count(b"\n"), name
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    assert m["host"] == host
    assert abs(int(m["sec"]) - time.time()) < 600
    assert int(m["usec"]) < 1_000_000


# --- swaks ------------------------------------------------------------------------------

SWAKS_DATA = (b"From: Alice <alice@example.org>\n"
              b"To: joe@example.com, box@example.com\n"
              b"Subject: lmtp-swaks\n"
              b"Message-ID: <lmtp-swaks@example.org>\n"
              b"\n"
              b"first line\n"
              b"From the start of a line\n"
              b">From a quoted line\n"
              b">>From quoted twice\n"
              b"From\n"
              b"Fromage is no separator\n"
              b"last line\n")


def swaks_data_sent(out):
    """The message as swaks shows it sent: the `` -> `` lines between 354 and the dot."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354 ")) + 1
    end = lines.index(" -> .", start)
    assert all(line.startswith(" -> ") for line in lines[start:end]), lines[start:end]
    return "".join(line[4:] + "\r\n" for line in lines[start:end]).encode()


def test_swaks_lmtp_replies_per_recipient_and_stores_exact_bytes(make_server, tmp_path):
    server = start_mda(make_server)
    data_file = tmp_path / "message.txt"
    data_file.write_bytes(SWAKS_DATA)
    argv = [program("swaks"), "--socket", str(server.lmtp_socket), "--protocol", "LMTP",
            "--helo", "swaks.example.org", "--from", "alice@example.org",
            "--to", "joe@example.com,box@example.com,nobody@example.com",
            "--data", f"@{data_file}", "--timeout", "30"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    out = p.stdout
    assert "<-  220 mx.mailsys.test LMTP" in out, out
    assert re.search(r"^ -> LHLO swaks\.example\.org$", out, re.M), out
    # RCPT: 250 for the two accounts, 550 5.1.1 for the unknown one, in order.
    rcpt = re.findall(r"^ -> RCPT TO:<([^>]*)>\n<[-*~]* +(.*)$", out, re.M)
    assert [(a, r[:9]) for a, r in rcpt] == [("joe@example.com", "250 2.1.5"),
                                             ("box@example.com", "250 2.1.5"),
                                             ("nobody@example.com", "550 5.1.1")], out
    assert "<nobody@example.com>" in rcpt[2][1]
    # After the dot: exactly one reply per accepted recipient, both delivered.
    after_dot = out.split("\n -> .\n", 1)[1].splitlines()
    replies = [line.split(None, 1)[1] for line in after_dot if line.startswith("<")]
    assert len(replies) == 3 and replies[2].startswith("221 "), out
    assert DELIVERED.match(replies[0]) and DELIVERED.match(replies[1]), out

    sent = swaks_data_sent(out)
    # swaks sends the file with CRLF line ends (and may add an empty last line).
    crlf = SWAKS_DATA.replace(b"\n", b"\r\n")
    assert sent.startswith(crlf) and sent[len(crlf):] in (b"", b"\r\n"), sent
    # Maildir: exactly the message plus our two header lines, LF line ends.
    name, data = only_file(maildir_of(server, "joe@example.com"))
    assert data == stored_form("alice@example.org", "joe@example.com", sent)
    assert b"\r" not in data
    check_maildir_name(name, data)
    md = mailbox.Maildir(maildir_of(server, "joe@example.com"), factory=None, create=False)
    (key,) = md.keys()
    assert md.get_bytes(key) == data
    parsed = md[key]
    assert parsed["Return-Path"] == "<alice@example.org>"
    assert parsed["Delivered-To"] == "joe@example.com"
    assert parsed.get_payload(decode=True) == sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    # mbox: From line, the same bytes mboxrd-quoted, a blank line; nothing else.
    raw = mbox_of(server, "box@example.com").read_bytes()
    stored = stored_form("alice@example.org", "box@example.com", sent)
    assert mbox_record("alice@example.org", stored).fullmatch(raw), raw
    assert b"\n>From the start of a line\n>>From a quoted line\n>>>From quoted twice\n" \
           b"From\nFromage is no separator\n" in raw
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert len(mb) == 1
    assert mboxrd_unquote(mb.get_bytes(0)) == stored
    assert mb[0].get_from().startswith("alice@example.org ")
    assert not (maildir_of(server, "nobody@example.com")).exists()
    server.wait_for_log(r"reject: RCPT from .*550 5\.1\.1 <nobody@example\.com>")
    server.wait_for_log(r"to=<joe@example\.com>, relay=local, .*dsn=2\.0\.0, status=sent")
    server.wait_for_log(r"to=<box@example\.com>, relay=local, .*dsn=2\.0\.0, status=sent")


# --- bytes through both stores ----------------------------------------------------------

TRICKY = [
    ("plain", b"one line\r\n"),
    ("from-lines", b"From me\r\n>From you\r\n>>From them\r\nFrom\r\n From indented\r\nx From y\r\n"),
    ("from-first-and-last", b"From the first body line\r\nmiddle\r\nFrom the last line\r\n"),
    ("dots", b".\r\n..\r\n.leading dot\r\n...three\r\n"),
    ("utf8", "Grüße aus Köln, ☃ 雪だるま\r\nFrom Zürich\r\n".encode("utf-8")),
    ("blank-lines", b"\r\n\r\nafter two blank lines\r\n\r\n"),
    ("no-body", b""),
]


def test_bodies_round_trip_through_maildir_and_mbox(make_server):
    server = start_mda(make_server)
    sent = {}
    client = LMTPClient(server.lmtp_socket)
    try:
        for i, (marker, body) in enumerate(TRICKY):
            msg = message(f"tricky-{marker}", body)
            sender = "" if i == 2 else "sender@example.org"   # one from the null sender
            _, rcpt, after = client.transaction(sender, ["joe@example.com", "box@example.com"], msg)
            assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 2, (marker, rcpt)
            assert len(after) == 2 and all(DELIVERED.match(r) for r in after), (marker, after)
            sent[f"tricky-{marker}"] = (sender, msg)
    finally:
        client.quit()

    def marker_of(data):
        return re.search(rb"(?m)^Subject: (\S+)$", data).group(1).decode()

    files = maildir_files(maildir_of(server, "joe@example.com"))
    assert len(files) == len(TRICKY)
    by_marker = {marker_of(d): (n, d) for n, d in files.items()}
    assert set(by_marker) == set(sent)
    for marker, (sender, msg) in sent.items():
        name, data = by_marker[marker]
        assert data == stored_form(sender, "joe@example.com", msg), marker
        check_maildir_name(name, data)

    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert len(mb) == len(TRICKY)
    for key, (marker, (sender, msg)) in zip(mb.keys(), sent.items()):
        stored = stored_form(sender, "box@example.com", msg)
        assert mboxrd_unquote(mb.get_bytes(key)) == stored, marker
        assert mb[key].get_from().split()[0] == (sender or "MAILER-DAEMON")
    raw = mbox_of(server, "box@example.com").read_bytes()
    expected = rb"".join(b"From " + re.escape((s or "MAILER-DAEMON").encode()) + b" " + ASCTIME + b"\n"
                         + re.escape(mboxrd_quote(stored_form(s, "box@example.com", m))) + b"\n"
                         for s, m in sent.values())
    assert re.fullmatch(expected, raw, re.S), raw


# --- smtp-source ------------------------------------------------------------------------

def test_smtp_source_lmtp_over_the_unix_socket(make_server):
    server = start_mda(make_server)
    argv = [program("smtp-source"), "-L", "-s", "5", "-m", "200", "-l", "4096",
            "-M", "source.example.org", "-f", "source@example.org", "-t", "joe@example.com",
            f"unix:{server.lmtp_socket}"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"smtp-source exited {p.returncode}: {p.stdout}{p.stderr}"
    files = maildir_files(maildir_of(server, "joe@example.com"))
    assert len(files) == 200
    assert os.listdir(maildir_of(server, "joe@example.com") / "tmp") == []
    bodies, ids = set(), set()
    for name, data in files.items():
        check_maildir_name(name, data)
        assert data.startswith(b"Return-Path: <source@example.org>\nDelivered-To: joe@example.com\n"
                               b"From: <source@example.org>\nTo: <joe@example.com>\n"), data[:200]
        head, body = data.split(b"\n\n", 1)
        bodies.add(body)
        ids.update(line for line in head.split(b"\n") if line.lower().startswith(b"message-id:"))
    assert len(ids) == 200          # 200 different messages, each stored once
    (body,) = bodies                # smtp-source's payload is the same in every message
    assert 4096 <= len(body) + body.count(b"\n") <= 4098
    assert len(re.findall(r"to=<joe@example\.com>, relay=local, .*status=sent",
                          server.log_text())) == 200


def test_unix_socket_shutdown_and_restart(make_server):
    """SIGTERM removes the socket cleanly (no traceback in the log), and a restart
    listens on the same path again."""
    server = start_mda(make_server)
    assert server.lmtp_socket.is_socket()
    # Some sessions first, so that every process of the server is serving.
    for i in range(10):
        _, _, after = lmtp_deliver(server.lmtp_socket, "s@example.org", ["joe@example.com"],
                                   message(f"before-stop-{i}"))
        assert len(after) == 1 and DELIVERED.match(after[0]), after
    time.sleep(1.0)
    assert server.stop() == -signal.SIGTERM
    assert not server.lmtp_socket.exists()
    log = server.log_text()
    assert "Traceback" not in log and "Unhandled error" not in log, log[-3000:]
    server.start()
    _, _, after = lmtp_deliver(server.lmtp_socket, "s@example.org", ["joe@example.com"],
                               message("after-restart"))
    assert len(after) == 1 and DELIVERED.match(after[0]), after
    assert server.stop() == -signal.SIGTERM
    assert "Traceback" not in server.log_text()


# --- TCP --------------------------------------------------------------------------------

def test_lmtp_over_tcp(make_server):
    server = start_mda(make_server, unix=False, tcp=True)
    client = LMTPClient(("127.0.0.1", server.lmtp_port))
    try:
        assert client.greeting == "220 mx.mailsys.test LMTP"
        assert client.lhlo.splitlines()[0] == "250-mx.mailsys.test"
        assert {line[4:] for line in client.lhlo.splitlines()[1:]} >= {
            "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "SIZE 27262976"}   # 25 MiB + 1 MiB
        assert client.command("EHLO x")[:3] == "500"   # LMTP has no EHLO (RFC 2033 4.1)
        msg = message("over-tcp")
        mail, rcpt, after = client.transaction("sender@example.org",
                                               ["joe@example.com", "box@example.com"], msg)
        assert mail == "250 2.1.0 Ok"
        assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 2
        assert len(after) == 2 and all(DELIVERED.match(r) for r in after), after
    finally:
        client.quit()
    _, data = only_file(maildir_of(server, "joe@example.com"))
    assert data == stored_form("sender@example.org", "joe@example.com", msg)
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert [mboxrd_unquote(mb.get_bytes(k)) for k in mb.keys()] == \
        [stored_form("sender@example.org", "box@example.com", msg)]
    server.wait_for_log(r"to=<joe@example\.com>, relay=local, .*status=sent")


# --- permissions ------------------------------------------------------------------------

def mode(path):
    return oct(os.stat(path).st_mode & 0o777)


def test_mailbox_directories_are_private(make_server):
    server = start_mda(make_server)
    assert not (server.mail_root / "example.com").exists()
    _, _, after = lmtp_deliver(server.lmtp_socket, "sender@example.org",
                               ["joe@example.com", "box@example.com"], message("modes"))
    assert all(DELIVERED.match(r) for r in after) and len(after) == 2, after
    maildir = maildir_of(server, "joe@example.com")
    for d in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert mode(d) == "0o700", d
    (name,) = os.listdir(maildir / "new")
    assert mode(maildir / "new" / name) == "0o600"
    box = mbox_of(server, "box@example.com")
    assert mode(box.parent) == "0o700"
    assert mode(box) == "0o600"
    # Every directory the first delivery created is 0700, the user's home above
    # Maildir and the domain directory included (issue 4: "Directories created on
    # first delivery with mode 0700"), whatever the umask.
    assert mode(maildir.parent) == "0o700", f"{maildir.parent} (the Maildir user's home)"
    assert mode(server.mail_root / "example.com") == "0o700", "the domain directory"


# --- aliases, plus-addressing, case ------------------------------------------------------

ALIASES = """\
# CONTRACT section 3 aliases
team@example.com: joe@example.com, box@example.com
staff: team@example.com,
    ann
mixed@example.com: joe@example.com, tiny@example.com
"""


def test_alias_fans_out_to_every_account(make_server):
    server = start_mda(make_server, aliases=ALIASES)
    client = LMTPClient(server.lmtp_socket)
    try:
        team = message("alias-team")
        _, rcpt, after = client.transaction("sender@example.org", ["team@example.com"], team)
        assert [r[:9] for r in rcpt] == ["250 2.1.5"]
        assert len(after) == 1 and DELIVERED.match(after[0]), after   # one reply: one recipient
        # Nested and bare: staff@example.net is team@example.com plus ann@example.net,
        # which is no account; staff@example.com reaches joe, box and ann.
        staff = message("alias-staff")
        _, rcpt, after = client.transaction("sender@example.org", ["staff@example.com"], staff)
        assert [r[:9] for r in rcpt] == ["250 2.1.5"] and len(after) == 1
        assert DELIVERED.match(after[0]), after
        # Worst outcome wins: one target over quota fails the alias recipient.
        big = message("alias-mixed", b"x" * 3000 + b"\r\n")
        _, rcpt, after = client.transaction("sender@example.org", ["mixed@example.com"], big)
        assert [r[:9] for r in rcpt] == ["250 2.1.5"]
        assert len(after) == 1 and after[0].startswith("552 5.2.2 "), after
    finally:
        client.quit()
    joe = sorted(maildir_files(maildir_of(server, "joe@example.com")).values())
    assert stored_form("sender@example.org", "joe@example.com", team) in joe
    assert stored_form("sender@example.org", "joe@example.com", staff) in joe
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert [mboxrd_unquote(mb.get_bytes(k)) for k in mb.keys()] == [
        stored_form("sender@example.org", "box@example.com", team),
        stored_form("sender@example.org", "box@example.com", staff)]
    assert list(maildir_files(maildir_of(server, "ann@example.com")).values()) == [
        stored_form("sender@example.org", "ann@example.com", staff)]
    assert maildir_files(maildir_of(server, "tiny@example.com")) == {}


def test_alias_with_a_remote_target_never_drops_that_copy(make_server):
    """CONTRACT section 3: an alias target may be remote ("remote targets are relayed").
    Over LMTP the MDA cannot deliver that copy itself, so a 250 for the alias is only
    honest if the remote copy was handed on (queued in the spool); otherwise the
    recipient must not get 250 -- a silently dropped copy is a lost message."""
    server = start_mda(make_server, aliases="ext@example.com: joe@example.com, someone@remote.example\n")
    msg = message("alias-remote")
    _, rcpt, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", ["ext@example.com"], msg)
    if rcpt[0].startswith("250") and after and after[0].startswith("250"):
        deadline = time.monotonic() + 5
        while True:
            queued = [e for e in server.spool()
                      if "someone@remote.example" in {r.get("rcpt") for r in e.envelope.get("recipients", [])}]
            handed_on = re.search(r"to=<someone@remote\.example>", server.log_text())
            if queued or handed_on or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert queued or handed_on, (
            f"ext@example.com got {after[0]!r}, but the copy for the remote "
            f"target someone@remote.example was neither queued nor relayed: it is lost")
    else:
        # Refused or deferred: the sender keeps the message; nothing may be half-delivered
        # as if the alias had succeeded.
        assert (rcpt[0][:1] in "45") or (after and after[0][:1] in "45"), (rcpt, after)


def test_plus_addressing_and_case_reach_the_account(make_server):
    server = start_mda(make_server)
    rcpts = ["joe+tag@example.com", "Joe+News@EXAMPLE.COM", "JOE@Example.Com"]
    msg = message("plus")
    _, rcpt, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", rcpts, msg)
    assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 3
    assert len(after) == 3 and all(DELIVERED.match(r) for r in after), after
    files = maildir_files(maildir_of(server, "joe@example.com"))
    # three RCPTs, three replies, but one mailbox: one copy (RFC 2033 asks for the
    # replies; a second copy of the same message in the same mailbox helps nobody)
    assert list(files.values()) == [stored_form("sender@example.org", "joe@example.com", msg)]
    assert sorted(os.listdir(server.mail_root / "example.com")) == ["joe"]


# --- path safety ------------------------------------------------------------------------

def tree(base, skip):
    out = set()
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p not in skip:
                out.add(p)
    return out


def test_path_escapes_are_refused_and_write_nothing(make_server):
    server = start_mda(make_server)
    # Create the domain directory and one mailbox first, so that a relative path
    # below them would exist to be written into.
    _, _, after = lmtp_deliver(server.lmtp_socket, "s@example.org", ["joe@example.com"], message("x"))
    assert DELIVERED.match(after[0])
    tag = f"mailsys-escape-{os.getpid()}-{random.randrange(10**9)}"
    outside = Path("/tmp") / tag
    escapes = [
        "../x@example.com", "../../x@example.com", "..@example.com", "./joe@example.com",
        ".x@example.com", ".joe@example.com", "a/b@example.com", "joe/../box@example.com",
        "joe/..@example.com", "\\..\\x@example.com", "..%2fx@example.com",
        f"../../../../../../../../../..{outside}@example.com",
        f"{'../' * 12}tmp/{tag}@example.com",
        "a" * 300 + "@example.com", "b" * 65 + "@example.com",
        "x@../example.com", "x@example.com/..", f"x@..{outside}", "joe@example.com/../../x",
        '"../x"@example.com', '"a/b"@example.com', '".x"@example.com',
    ]
    skip = {str(server.log_path), str(server.output_path)}
    before = tree(server.base, skip)

    def refused(rcpt_line, syntax=r"501 5\.[15]\.[0-9]"):
        # A new session for each attempt: the server ends a session after too many
        # errors (421 4.7.0), which is not what is tested here.
        client = LMTPClient(server.lmtp_socket)
        try:
            assert client.command("MAIL FROM:<s@example.org>").startswith("250")
            client.send_raw(rcpt_line + b"\r\n")
            reply = client.reply()
            assert re.match(rf"(550 5\.1\.1|553 5\.1\.3|{syntax}) ", reply), (rcpt_line, reply)
            # Nothing was accepted: DATA has no recipient.
            assert client.command("DATA")[:1] in ("5", "4")
        finally:
            client.quit()

    for rcpt in escapes:
        refused(f"RCPT TO:<{rcpt}>".encode())
    refused(b"RCPT TO:<a\x00b@example.com>")   # a NUL, sent raw
    assert tree(server.base, skip) == before
    assert not outside.exists()
    assert os.listdir(server.mail_root) == ["example.com"]
    assert os.listdir(server.mail_root / "example.com") == ["joe"]


def test_plus_tags_never_become_paths(make_server):
    """A tag is not part of the account: whatever it holds, the mail goes to the
    account's own mailbox (or is refused) and nothing else appears on disk."""
    server = start_mda(make_server)
    skip = {str(server.log_path), str(server.output_path)}
    before = tree(server.base, skip)
    tags = ["joe+../../../x@example.com", "joe+/x@example.com", "joe+..@example.com",
            "joe+.x@example.com", "joe+a/b@example.com"]
    msg = message("plus-escape")
    accepted = 0
    client = LMTPClient(server.lmtp_socket)
    try:
        for rcpt in tags:
            _, rcpts, after = client.transaction("s@example.org", [rcpt], msg)
            assert re.match(r"(250 2\.1\.5|550 5\.1\.1|553 5\.1\.3|501 5\.[15]\.[0-9]) ", rcpts[0]), \
                (rcpt, rcpts)
            if rcpts[0].startswith("250"):
                assert len(after) == 1 and DELIVERED.match(after[0]), (rcpt, after)
                accepted += 1
    finally:
        client.quit()
    maildir = maildir_of(server, "joe@example.com")
    created = tree(server.base, skip) - before
    allowed = {str(server.mail_root), str(server.mail_root / "example.com"),
               str(maildir.parent), str(maildir)} | {str(maildir / s) for s in ("tmp", "new", "cur")}
    # Another worker process opens its own (empty) spool segment when it starts,
    # which may be after the snapshot above: that is not the MDA's doing.
    segments = str(server.state_dir / "spool" / "segments")
    strays = {p for p in created if p not in allowed and os.path.dirname(p) != str(maildir / "new")
              and not (os.path.dirname(p) == segments and p.endswith(".seg")
                       and os.path.getsize(p) == 0)}
    assert strays == set()
    files = maildir_files(maildir)
    assert len(files) == accepted
    assert set(files.values()) <= {stored_form("s@example.org", "joe@example.com", msg)}


# --- loops and quotas -------------------------------------------------------------------

def test_delivered_to_loop_fails_that_recipient_only(make_server):
    server = start_mda(make_server)
    msg = message("loop", extra=b"Delivered-To: joe@example.com\r\n")
    _, rcpt, after = lmtp_deliver(server.lmtp_socket, "sender@example.org",
                                  ["joe@example.com", "box@example.com", "ann@example.com"], msg)
    assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 3
    assert len(after) == 3
    assert after[0].startswith("554 5.4.6 ") and "<joe@example.com>" in after[0], after
    assert DELIVERED.match(after[1]) and DELIVERED.match(after[2]), after
    assert maildir_files(maildir_of(server, "joe@example.com")) == {}
    assert list(maildir_files(maildir_of(server, "ann@example.com")).values()) == [
        stored_form("sender@example.org", "ann@example.com", msg)]
    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    assert [mboxrd_unquote(mb.get_bytes(k)) for k in mb.keys()] == [
        stored_form("sender@example.org", "box@example.com", msg)]
    server.wait_for_log(r"to=<joe@example\.com>, relay=local, .*dsn=5\.4\.6, status=bounced")


def test_quota_fails_that_recipient_only(make_server):
    server = start_mda(make_server)       # tiny@example.com: quota=2000 (mailsys user add --quota)
    client = LMTPClient(server.lmtp_socket)
    try:
        small = message("quota-small", b"s" * 500 + b"\r\n")
        _, _, after = client.transaction("sender@example.org", ["tiny@example.com"], small)
        assert len(after) == 1 and DELIVERED.match(after[0]), after
        big = message("quota-big", b"b" * 1500 + b"\r\n")     # 500 + 1500 + headers > 2000
        _, rcpt, after = client.transaction("sender@example.org",
                                            ["joe@example.com", "tiny@example.com", "ann@example.com"],
                                            big)
        assert [r[:9] for r in rcpt] == ["250 2.1.5"] * 3
        assert len(after) == 3
        assert DELIVERED.match(after[0]) and DELIVERED.match(after[2]), after
        assert after[1].startswith("552 5.2.2 ") and "<tiny@example.com>" in after[1], after
    finally:
        client.quit()
    assert list(maildir_files(maildir_of(server, "tiny@example.com")).values()) == [
        stored_form("sender@example.org", "tiny@example.com", small)]
    assert list(maildir_files(maildir_of(server, "joe@example.com")).values()) == [
        stored_form("sender@example.org", "joe@example.com", big)]
    server.wait_for_log(r"to=<tiny@example\.com>, relay=local, .*dsn=5\.2\.2, status=bounced")


def test_mbox_append_after_an_interrupted_one(make_server):
    """What kill -9 in the middle of an mbox append leaves (a From line and part of a
    message, no final newline; the killed process cannot truncate it back) must not
    swallow the next message: after a restart, a new delivery is a message of its
    own, intact, and the half-written one is gone (issue 4: "the mbox is never left
    half-written")."""
    server = start_mda(make_server)
    first = message("mbox-first")
    _, _, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", ["box@example.com"], first)
    assert DELIVERED.match(after[0]), after
    server.stop()
    box = mbox_of(server, "box@example.com")
    complete = box.read_bytes()
    with open(box, "ab") as f:     # an append cut short by SIGKILL
        f.write(b"From sender@example.org Fri Nov 27 12:00:00 2026\nReturn-Path: <sender@example.org>\n"
                b"Delivered-To: box@example.com\nSubject: mbox-half\n\nhalf a mess")
    server.start()
    second = message("mbox-second", b"the message after the crash\r\n")
    _, _, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", ["box@example.com"], second)
    assert DELIVERED.match(after[0]), after
    mb = mailbox.mbox(box, create=False)
    got = [mboxrd_unquote(mb.get_bytes(k)) for k in mb.keys()]
    assert got[-1] == stored_form("sender@example.org", "box@example.com", second), \
        f"the message delivered after the crash is not a message of its own: {got[-1][-400:]!r}"
    assert got[0] == stored_form("sender@example.org", "box@example.com", first)
    assert not any(b"half a mess" in m for m in got), "the half-written message is still there"
    assert box.read_bytes().startswith(complete)
    assert len(got) == 2


def test_kill9_in_the_middle_of_an_mbox_append_is_cut_back_by_its_dotlock_note(make_server):
    """A real append of a 22 MB message killed while it writes: the dotlock it
    leaves names where the append began (mailsys.mda.mbox, APPEND_NOTE), and
    once that lock is stale the next delivery after the restart cuts exactly
    the torn bytes (docs/mda.rst, "Crash recovery for mbox").  The lock is not
    aged: its holder, a mailsys process of this host, is dead, so the restarted
    server takes it at once instead of five minutes later.  The torn tail is
    then shortened to end right after one of the message's blank lines, as a
    kill landing there would leave it: the case only the note tells from a
    complete record.  An attempt whose kill lands after the write is repeated."""
    server = start_mda(make_server)
    first = message("note-first")
    _, _, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", ["box@example.com"], first)
    assert DELIVERED.match(after[0]), after
    box = mbox_of(server, "box@example.com")
    lock = Path(str(box) + ".lock")
    expected = [first]
    paragraph = b"0123456789 a line of the big message that a kill will cut\r\n" * 99 + b"\r\n"
    big = message("note-big", paragraph * 3_700)
    for attempt in range(8):
        complete = box.read_bytes()

        def send():
            try:
                lmtp_deliver(server.lmtp_socket, "sender@example.org", ["box@example.com"], big)
            except (OSError, EOFError):
                pass        # the kill came first

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:      # the note, then the first bytes of the append
            try:
                content = lock.read_bytes()
            except FileNotFoundError:
                continue
            if b"\nmailsys-append " in content and content.endswith(b"\n") \
                    and box.stat().st_size > len(complete):
                break
        else:
            pytest.fail("the append never started")
        server.kill9()
        sender.join(60)
        size = box.stat().st_size
        if len(complete) < size:
            with open(box, "r+b") as f:       # back to just after the last blank line written
                f.seek(len(complete))
                size = len(complete) + f.read(size - len(complete)).rindex(b"\n\n") + 2
                f.truncate(size)
        words = content.split(b"\n")[2].split()     # pid, "mailsys HOST", the note
        assert words[0] == b"mailsys-append" and int(words[1]) == len(complete), words
        end = int(words[-1])
        server.start()
        probe = message(f"note-probe-{attempt}")
        _, _, after = lmtp_deliver(server.lmtp_socket, "sender@example.org", ["box@example.com"], probe)
        assert DELIVERED.match(after[0]), after     # not 451 4.2.0: the dead holder's lock went at once
        assert not lock.exists()
        mb = mailbox.mbox(box, create=False)
        got = [mboxrd_unquote(mb.get_bytes(k)) for k in mb.keys()]
        expected += [probe] if size < end else [big, probe]
        assert got == [stored_form("sender@example.org", "box@example.com", m) for m in expected]
        if size < end:
            print(f"attempt {attempt}: the kill cut the append after {size - len(complete)} "
                  f"of {end - len(complete)} bytes")
            server.wait_for_log(rf"mbox {re.escape(str(box))}: cut {size - len(complete)} bytes "
                                rf"of an append a crash interrupted")
            data = box.read_bytes()
            assert data.startswith(complete) and b"note-big" not in data[len(complete):]
            return
        print(f"attempt {attempt}: the kill came after the write ({size} of {end} bytes); again")
    pytest.fail("no kill landed inside the append in 8 attempts")


# --- kill -9 ----------------------------------------------------------------------------

THREADS = 12
ROUNDS = 2
SIZES = (300, 3000, 40_000, 300_000, 1_500_000)
TARGETS = ("joe@example.com", "box@example.com")
SUBJECT = re.compile(rb"(?m)^Subject: (kill-r\d+-t\d+-\d+)$")


class Attempt:
    __slots__ = ("marker", "rcpt", "message", "state", "reply")

    def __init__(self, marker, rcpt, message):
        self.marker, self.rcpt, self.message = marker, rcpt, message
        self.state, self.reply = "early", None


def kill_message(marker, rng):
    size = rng.choice(SIZES)
    line = f"{marker} ".encode() + b"From the body 0123456789abcdefghijklmnopqrstuvwxyz"
    body = (line + b"\r\n") * max(1, size // (len(line) + 2))
    return (f"From: <load@example.org>\r\nTo: <x@example.com>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.org>\r\n\r\n").encode() + body


def load(path, round_no, thread_no, stop, attempts):
    rng = random.Random(f"{round_no}-{thread_no}")
    seq = 0
    client = None
    while not stop.is_set():
        seq += 1
        marker = f"kill-r{round_no}-t{thread_no}-{seq}"
        attempt = Attempt(marker, TARGETS[seq % 2], kill_message(marker, rng))
        attempts.append(attempt)
        try:
            if client is None:
                client = LMTPClient(path, timeout=20)

            def sent(a=attempt):
                a.state = "inflight"

            attempt.state = "unsent"
            _, rcpt, after = client.transaction("load@example.org", [attempt.rcpt], attempt.message,
                                                on_sent=sent)
            if not after:
                attempt.state = "early"
                attempt.reply = rcpt
                continue
            attempt.reply = after[0]
            attempt.state = "accepted" if DELIVERED.match(after[0]) else "rejected"
        except OSError:     # ConnectionError included: the server is gone
            if client is not None:
                client.close()
                client = None
            time.sleep(0.01)
    if client is not None:
        client.close()


def stored_markers(server, known):
    """{marker: count} in joe's Maildir/new and in box's mbox; every stored message
    must be a complete known message."""
    counts = collections.Counter()
    for name, data in maildir_files(maildir_of(server, "joe@example.com")).items():
        m = SUBJECT.search(data)
        assert m, f"a file in new/ without a known marker (partial?): {name} {data[:300]!r}"
        a = known.get(m.group(1).decode())
        assert a is not None and data == stored_form("load@example.org", "joe@example.com", a.message), \
            f"incomplete or altered file in new/: {name} ({len(data)} bytes)"
        check_maildir_name(name, data)
        counts[("joe@example.com", a.marker)] += 1
    path = mbox_of(server, "box@example.com")
    if path.exists():
        mb = mailbox.mbox(path, create=False)
        for key in mb.keys():
            data = mboxrd_unquote(mb.get_bytes(key))
            m = SUBJECT.search(data)
            assert m, f"mbox message {key} without a known marker: {data[:300]!r}"
            a = known.get(m.group(1).decode())
            assert a is not None and data == stored_form("load@example.org", "box@example.com",
                                                          a.message), \
                f"mbox message {key} ({m.group(1)!r}, {len(data)} bytes) is not a complete message"
            counts[("box@example.com", a.marker)] += 1
    return counts


def test_kill9_during_deliveries_leaves_only_complete_messages(make_server):
    """Twelve sessions deliver to a Maildir and an mbox (300 B to 1.5 MB) while the
    server gets SIGKILL, twice.  After each restart one more message goes to both
    mailboxes (the chance for a store to repair what the kill interrupted); then:
    every 250 is stored exactly once and intact, an in-flight message at most once,
    nothing else; every file in new/ and every message the mbox parses to is a
    complete message (tmp/ leftovers are allowed)."""
    server = start_mda(make_server)
    attempts = []
    for round_no in range(1, ROUNDS + 1):
        stop = threading.Event()
        mine = []
        threads = [threading.Thread(target=load, args=(server.lmtp_socket, round_no, t, stop, mine),
                                    daemon=True) for t in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(1.2, 2.0))
        server.kill9()
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client thread hangs"
        attempts.extend(mine)
        states = collections.Counter((a.rcpt, a.state) for a in mine)
        print(f"round {round_no}: {dict(sorted(states.items()))}")
        assert states[("joe@example.com", "accepted")] > 0 and states[("box@example.com", "accepted")] > 0, \
            f"round {round_no} delivered nothing to one of the stores: {states}"
        assert not [a for a in mine if a.state == "rejected"], \
            [(a.marker, a.reply) for a in mine if a.state == "rejected"][:5]

        # A dotlock held by the killed process stays behind.  Its holder, a mailsys
        # process of this host, is gone, so the restarted server removes it at once
        # (it used to wait five minutes; docs/mda.rst): the probe below must get 250.
        dotlock = Path(str(mbox_of(server, "box@example.com")) + ".lock")
        print(f"round {round_no}: dotlock left behind: {dotlock.exists()}")
        server.start()
        probe_marker = f"kill-r{round_no}-t99-1"
        probe = kill_message(probe_marker, random.Random(round_no))
        _, _, after = lmtp_deliver(server.lmtp_socket, "load@example.org", list(TARGETS), probe)
        assert len(after) == 2 and all(DELIVERED.match(r) for r in after), after
        print(f"round {round_no}: torn mbox appends cut: "
              f"{server.log_since_start().count('of an append a crash interrupted')}")
        for rcpt in TARGETS:
            a = Attempt(probe_marker, rcpt, probe)
            a.state = "accepted"
            attempts.append(a)
        assert not dotlock.exists()

        known = {a.marker: a for a in attempts}
        counts = stored_markers(server, known)
        for a in attempts:
            n = counts[(a.rcpt, a.marker)]
            if a.state == "accepted":
                assert n == 1, f"{a.marker} to {a.rcpt} got 250 but is stored {n} times"
            elif a.state == "inflight":
                assert n <= 1, f"{a.marker} to {a.rcpt} is stored {n} times"
            else:
                assert n == 0, f"{a.marker} to {a.rcpt} ({a.state}) is stored"
        assert "Traceback" not in server.log_since_start()
    # (A clean SIGTERM shutdown is test_unix_socket_shutdown_and_restart's subject.)
