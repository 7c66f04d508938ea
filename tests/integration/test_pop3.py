"""POP3 against a real ``twistd -n mailsys`` on loopback, with real clients.

Mail goes in through the MDA's LMTP listener (harness.start_mda); Python's poplib
reads it over STLS (``pop3``) and implicit TLS (``pop3s``); fetchmail retrieves
and deletes over both; Dovecot then opens the same Maildir and must see the
state POP3 left (\\Seen on what was retrieved, deleted messages gone).  The
server runs with its default number of worker processes, so the IN-USE lock
and the lock release after a dropped connection are exercised across processes.
"""
import os
import poplib
import re
import socket
import ssl
import subprocess
import time

import pytest

from tests.integration.harness import (LOOPBACK, DovecotPeer, HarnessError, find_program,
                                       lmtp_deliver, maildir_files, maildir_of, mbox_of,
                                       pop3_client, pop3_tls_context, start_pop3, stored_form,
                                       wait_for_match)

pytestmark = pytest.mark.integration

SENDER = "sender@example.org"
PASSWORD = "integration test password"
JOE, BOX = "joe@example.com", "box@example.com"   # Maildir and mbox accounts of the harness
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session"


def messages(tag):
    return [
        (f"From: <sender@example.org>\r\nSubject: {tag}-plain\r\nMessage-ID: <{tag}-1@example.org>"
         f"\r\n\r\nHello.\r\n").encode(),
        (f"From: <sender@example.org>\r\nSubject: {tag}-tricky\r\nMessage-ID: <{tag}-2@example.org>"
         f"\r\n\r\nFrom the start of a line\r\n>From quoted\r\n.leading dot\r\n..two\r\n.\r\n"
         f"Grüße ☃\r\n").encode("utf-8"),
        (f"From: <sender@example.org>\r\nSubject: {tag}-big\r\nMessage-ID: <{tag}-3@example.org>"
         f"\r\n\r\n").encode() + b"0123456789 The quick brown fox. From here on.\r\n" * 3000,
    ]


def deliver(server, account, msgs):
    for msg in msgs:
        _, rcpt, after = lmtp_deliver(server.lmtp_socket, SENDER, [account], msg)
        assert rcpt == ["250 2.1.5 Ok"] and after[0].startswith("250 2.0.0"), (rcpt, after)


def wire(account, msg):
    """What RETR must return (poplib removes the dot-stuffing and the terminator)."""
    return stored_form(SENDER, account, msg).replace(b"\n", b"\r\n")


def retr(client, n):
    _, lines, _ = client.retr(n)
    return b"".join(line + b"\r\n" for line in lines)


@pytest.fixture
def server(make_server):
    return start_pop3(make_server)


def login_retrying_in_use(server, account, implicit=True, timeout=10.0):
    """A login, retried while the previous session's lock is still being let go."""
    deadline = time.monotonic() + timeout
    while True:
        client = pop3_client(server, implicit)
        try:
            client.user(account)
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto as e:
            client.close()
            if not e.args[0].startswith(IN_USE) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("account", [JOE, BOX])
@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_poplib_retrieves_exactly_what_was_delivered_and_deletes(server, account, implicit):
    msgs = messages(f"poplib-{implicit}")
    deliver(server, account, msgs)
    client = pop3_client(server, implicit, login=account)
    try:
        expected = [wire(account, m) for m in msgs]
        assert client.stat() == (3, sum(len(e) for e in expected))
        resp, listing, _ = client.list()
        assert resp == f"+OK 3 messages ({sum(len(e) for e in expected)} octets)".encode()
        assert listing == [b"%d %d" % (i + 1, len(e)) for i, e in enumerate(expected)]
        _, uidl, _ = client.uidl()
        uids = [line.split()[1] for line in uidl]
        assert len(set(uids)) == 3
        for i, e in enumerate(expected):
            assert retr(client, i + 1) == e
        _, top, _ = client.top(2, 1)
        assert b"".join(line + b"\r\n" for line in top) == \
            expected[1].split(b"\r\n\r\n")[0] + b"\r\n\r\nFrom the start of a line\r\n"
        assert client.dele(2) == b"+OK Message 2 deleted"
        assert client.quit() == b"+OK Logging out (1 messages deleted)"
    finally:
        client.close()
    again = login_retrying_in_use(server, account, implicit)
    try:
        assert again.stat() == (2, len(expected[0]) + len(expected[2]))
        _, uidl2, _ = again.uidl()
        assert [line.split()[1] for line in uidl2] == [uids[0], uids[2]]
        assert retr(again, 2) == expected[2]
        again.quit()
    finally:
        again.close()
    if account == JOE:
        maildir = maildir_of(server, JOE)
        assert maildir_files(maildir, "new") == {}
        cur = maildir_files(maildir, "cur")
        assert sorted(n.split(":")[1] for n in cur) == ["2,S", "2,S"]
        assert sorted(cur.values()) == sorted(stored_form(SENDER, JOE, m) for m in (msgs[0], msgs[2]))
    else:
        data = mbox_of(server, BOX).read_bytes()
        assert data.count(b"\nSubject: ") == 2 and b"-tricky" not in data
        assert not os.path.exists(str(mbox_of(server, BOX)) + ".lock")


def test_capabilities_and_the_tls_rule_on_the_wire(server):
    client = poplib.POP3(LOOPBACK, server.pop3_port, timeout=30)
    try:
        assert client.getwelcome() == b"+OK mx.mailsys.test POP3 server ready"
        caps = client.capa()
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        with pytest.raises(poplib.error_proto) as e:
            client.user(JOE)
        assert e.value.args[0] == b"-ERR [AUTH] Authentication requires TLS: send STLS first"
        client.stls(pop3_tls_context())
        caps = client.capa()
        assert "STLS" not in caps and caps["USER"] == [] and caps["SASL"] == ["PLAIN"]
        client.user(JOE)
        assert client.pass_(PASSWORD).startswith(b"+OK Logged in: 0 messages (0 octets)")
        client.quit()
    finally:
        client.close()
    tls = pop3_client(server, implicit=True)
    try:
        caps = tls.capa()
        assert "STLS" not in caps and caps["SASL"] == ["PLAIN"]
        assert tls.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        tls.close()


def test_auth_plain_over_pop3s(server):
    import base64

    deliver(server, JOE, messages("sasl")[:1])
    sock = pop3_tls_context().wrap_socket(socket.create_connection((LOOPBACK, server.pop3s_port), 30))
    f = sock.makefile("rb")
    try:
        assert f.readline().startswith(b"+OK")
        token = base64.b64encode(f"\0{JOE}\0{PASSWORD}".encode())
        sock.sendall(b"AUTH PLAIN " + token + b"\r\n")
        assert f.readline() == b"+OK Logged in: 1 messages (%d octets)\r\n" % len(
            wire(JOE, messages("sasl")[0]))
        sock.sendall(b"QUIT\r\n")
        assert f.readline() == b"+OK Logging out (0 messages deleted)\r\n"
    finally:
        f.close()
        sock.close()


def test_uidl_is_stable_across_a_restart(server):
    deliver(server, JOE, messages("restart"))
    deliver(server, BOX, messages("restart"))
    before = {}
    for account in (JOE, BOX):
        c = pop3_client(server, login=account)
        before[account] = c.uidl()[1]
        c.quit()
    server.stop()
    server.start()
    for account in (JOE, BOX):
        c = pop3_client(server, login=account)
        assert c.uidl()[1] == before[account]
        c.quit()


def test_second_login_gets_in_use_across_worker_processes(server):
    first = pop3_client(server, login=JOE)
    try:
        # Several attempts: the kernel spreads them over the worker processes.
        for i in range(6):
            other = pop3_client(server, implicit=bool(i % 2))
            try:
                other.user(JOE)
                with pytest.raises(poplib.error_proto) as e:
                    other.pass_(PASSWORD)
                assert e.value.args[0] == IN_USE
                # the session stays in AUTHORIZATION and usable ...
                assert other.quit() == b"+OK mx.mailsys.test POP3 server signing off"
            finally:
                other.close()
        assert first.stat() == (0, 0)                  # ... and the first is unharmed
        first.quit()
    finally:
        first.close()
    login_retrying_in_use(server, JOE).quit()


def test_dropped_connection_deletes_nothing(server):
    msgs = messages("drop")
    deliver(server, JOE, msgs)
    deliver(server, BOX, msgs)
    for account in (JOE, BOX):
        c = pop3_client(server, login=account)
        assert retr(c, 1) == wire(account, msgs[0])
        c.dele(1)
        c.dele(2)
        c.dele(3)
        c.sock.shutdown(socket.SHUT_RDWR)    # gone without QUIT
        c.close()
        again = login_retrying_in_use(server, account)
        try:
            assert again.stat()[0] == 3
            assert retr(again, 3) == wire(account, msgs[2])
            again.quit()
        finally:
            again.close()
    # The dropped session's RETR 1 left no \Seen; the second session's RETR 3 did.
    new = maildir_files(maildir_of(server, JOE), "new")
    assert sorted(new.values()) == sorted(stored_form(SENDER, JOE, m) for m in msgs[:2])
    cur = maildir_files(maildir_of(server, JOE), "cur")
    assert [n.split(":")[1] for n in cur] == ["2,S"]
    assert list(cur.values()) == [stored_form(SENDER, JOE, msgs[2])]


# -- fetchmail ------------------------------------------------------------------------------

def run_fetchmail(server, tmp_path, account, implicit):
    fetchmail = find_program("fetchmail")
    if fetchmail is None:
        pytest.fail("fetchmail is not installed; `bash .ci/test-all` installs the Debian package")
    home = tmp_path / f"fetchmail-{'ssl' if implicit else 'stls'}"
    home.mkdir()
    out = home / "delivered"
    rc = home / "fetchmailrc"
    port = server.pop3s_port if implicit else server.pop3_port
    ssl_opts = "ssl sslproto 'tls1.2+'" if implicit else "sslproto 'tls1.2+'"
    rc.write_text(
        f"set no syslog\n"
        f"poll {LOOPBACK} service {port} protocol pop3 auth password timeout 30\n"
        f"  user \"{account}\" there with password \"{PASSWORD}\" is root here\n"
        f"  {ssl_opts} no sslcertck nokeep fetchall\n"
        f"  mda \"cat >> {out}; echo '----fetchmail-separator----' >> {out}\"\n")
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    p = subprocess.run([fetchmail, "-f", str(rc), "-v", "--nodetach", "--pidfile",
                        str(home / "pid")], capture_output=True, text=True, env=env,
                       timeout=120, stdin=subprocess.DEVNULL)
    return p, out


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_retrieves_and_deletes(server, tmp_path, implicit):
    msgs = messages(f"fetchmail-{implicit}")
    deliver(server, JOE, msgs)
    deliver(server, BOX, msgs)
    for account in (JOE, BOX):
        base = tmp_path / account.split("@")[0]
        base.mkdir()
        p, out = run_fetchmail(server, base, account, implicit)
        log = p.stdout + p.stderr
        assert p.returncode == 0, log
        if not implicit:
            assert re.search(r"STLS", log), log
        assert "3 messages" in log, log
        assert log.count("flushed") == 3, log
        got = out.read_bytes().split(b"----fetchmail-separator----\n")
        assert got[-1] == b"" and len(got) == 4
        for data, msg in zip(got[:3], msgs):
            # fetchmail puts its own Received header in front; the rest is ours, LF line ends
            assert data.startswith(b"Received: ") and data.endswith(stored_form(SENDER, account, msg)), \
                data[:400]
        c = login_retrying_in_use(server, account)
        assert c.stat() == (0, 0)
        c.quit()


# -- Dovecot sees the state POP3 left ------------------------------------------------------

def test_dovecot_sees_seen_and_deleted_state(server, tmp_path):
    msgs = messages("dovecot")
    deliver(server, JOE, msgs)
    c = pop3_client(server, login=JOE)
    assert retr(c, 1) == wire(JOE, msgs[0])
    assert retr(c, 2) == wire(JOE, msgs[1])
    c.dele(2)
    c.quit()
    server.stop()
    dovecot = DovecotPeer(tmp_path / "dovecot", server.mail_root)
    dovecot.start()
    try:
        imap = dovecot.imap(JOE)
        try:
            typ, data = imap.select("INBOX")
            assert typ == "OK" and data == [b"2"], data
            typ, data = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK", data
            got = {}
            for item in data:
                if isinstance(item, tuple):
                    subject = re.search(rb"Subject: (\S+)", item[1]).group(1).decode()
                    flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()
                    got[subject] = sorted(f for f in flags if f != "\\Recent")   # first open
            assert got == {"dovecot-plain": ["\\Seen"], "dovecot-big": []}, got
        finally:
            imap.logout()
        log = dovecot.log_text()
    finally:
        dovecot.stop()
    problems = [line for line in log.splitlines() if re.search(r"\b(Error|Panic|Fatal|Warning):", line)]
    assert problems == [], "\n".join(problems)


# -- an mbox another program holds or changes during the session ------------------------------

def pop3_log(server, pattern, timeout=15):
    """The text (after the ``[mailsys.pop3#LEVEL] `` of its stamp) and level of the
    first server log line matching ``pattern``, waiting for it (worker processes
    relay their lines)."""
    m = wait_for_match(server.log_text, r"^\S+ \[mailsys\.pop3#(\w+)\] (" + pattern + r")$",
                       timeout, lambda: server.log_text()[-3000:])
    return m.group(1), m.group(2)


def test_mbox_expunged_in_place_by_dovecot_during_a_session(server, tmp_path):
    """Dovecot expunges message 2 of the mbox over IMAP while a POP3 session
    is open: it rewrites the file in place (same inode) and adds its X-IMAPbase,
    X-UID and Status headers.  The session must neither send message 3's bytes
    as message 2 nor delete anything at QUIT; the next session lists the two
    remaining messages under the UIDLs they had."""
    msgs = messages("dovecot-mbox")
    deliver(server, BOX, msgs)
    path = mbox_of(server, BOX)
    c = pop3_client(server, login=BOX)
    try:
        uids = [line.split()[1] for line in c.uidl()[1]]
        assert retr(c, 1) == wire(BOX, msgs[0])
        ino = os.stat(path).st_ino
        (path.parent / "mail").mkdir(exist_ok=True)
        dovecot = DovecotPeer(tmp_path / "dovecot", server.mail_root,
                              mail_location=f"mbox:{server.mail_root}/%d/%n/mail:"
                                            f"INBOX={server.mail_root}/%d/%n/mbox:INDEX=MEMORY")
        dovecot.start()
        try:
            imap = dovecot.imap(BOX)
            try:
                assert imap.select("INBOX") == ("OK", [b"3"])
                assert imap.store("2", "+FLAGS", "\\Deleted")[0] == "OK"
                assert imap.expunge()[0] == "OK"
            finally:
                imap.logout()
        finally:
            dovecot.stop()
        after = path.read_bytes()
        assert os.stat(path).st_ino == ino and after.count(b"\nX-UID: ") == 2   # in place, with its headers
        with pytest.raises(poplib.error_proto) as e:
            c.retr(2)
        assert e.value.args[0] == b"-ERR [SYS/TEMP] Message 2 cannot be read now"
        assert c.dele(3) == b"+OK Message 3 deleted"
        with pytest.raises(poplib.error_proto) as e:
            c.quit()
        assert e.value.args[0] == (b"-ERR [SYS/TEMP] Deleted messages were not removed: "
                                   b"the mailbox could not be updated")
    finally:
        c.close()
    assert path.read_bytes() == after
    assert pop3_log(server, r"pop3: warning: \S+: user=<box@example\.com>: deleted messages .*") == (
        "warn", "pop3: warning: localhost[127.0.0.1]: user=<box@example.com>: deleted messages "
                "were not removed: mbox was changed by another program since the login "
                "(it is shorter)")
    again = login_retrying_in_use(server, BOX)
    try:
        assert again.stat()[0] == 2
        assert [line.split()[1] for line in again.uidl()[1]] == [uids[0], uids[2]]
        assert b"Subject: dovecot-mbox-big" in retr(again, 2)
        again.quit()
    finally:
        again.close()
    assert "#critical" not in server.log_text()


def test_pipelined_quit_then_close_logs_what_was_deleted(server):
    """The client closes right after a pipelined DELE ... QUIT, before the
    commit has finished: the one disconnect line still counts every deletion."""
    deliver(server, JOE, messages("pipelined"))
    sock = pop3_tls_context().wrap_socket(socket.create_connection((LOOPBACK, server.pop3s_port), 30))
    f = sock.makefile("rb")
    try:
        assert f.readline().startswith(b"+OK")
        sock.sendall(f"USER {JOE}\r\nPASS {PASSWORD}\r\n".encode())
        assert f.readline() == b"+OK Send your password\r\n"
        assert f.readline().startswith(b"+OK Logged in: 3 messages")
        sock.sendall(b"DELE 1\r\nDELE 2\r\nDELE 3\r\nQUIT\r\n")
    finally:
        f.close()
        sock.close()
    assert pop3_log(server, r"pop3: disconnect from \S+ user=<joe@example\.com> .*") == (
        "info", "pop3: disconnect from localhost[127.0.0.1] user=<joe@example.com> "
                "retr=0/0, top=0, dele=3, deleted=3")
    c = login_retrying_in_use(server, JOE)
    assert c.stat() == (0, 0)
    c.quit()


def test_login_while_another_program_holds_the_mbox_lock(server):
    """``echo 99999 > mbox.lock``: after the 10 s lock timeout the login gets
    [IN-USE] (RFC 2449 8.1.1) and the log one warning line naming the lock;
    no traceback, and the lock is left alone."""
    deliver(server, BOX, messages("locked")[:1])
    lock = str(mbox_of(server, BOX)) + ".lock"
    with open(lock, "w") as f:
        f.write("99999\n")
    c = pop3_client(server)
    try:
        c.user(BOX)
        start = time.monotonic()
        with pytest.raises(poplib.error_proto) as e:
            c.pass_(PASSWORD)
        assert e.value.args[0] == b"-ERR [IN-USE] Mailbox is locked by another program, try again later"
        assert time.monotonic() - start >= 9
        assert c.quit() == b"+OK mx.mailsys.test POP3 server signing off"
    finally:
        c.close()
    assert pop3_log(server, r"pop3: warning: \S+: user=<box@example\.com>: cannot open .*") == (
        "warn", f"pop3: warning: localhost[127.0.0.1]: user=<box@example.com>: cannot open the "
                f"mailbox: mbox is locked by another program: {lock} was held for more than 10 s")
    assert open(lock).read() == "99999\n"
    assert "#critical" not in server.log_text() and "Traceback" not in server.log_text()
