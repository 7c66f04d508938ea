"""Submission (RFC 6409) on 587 with STARTTLS and on 465 with implicit TLS (RFC 8314),
against a real ``twistd -n mailsys`` on loopback, with the clients people use:
msmtp, swaks and Python's smtplib.

The server runs mta + submission + submissions with a certificate made by
``mailsys.tls.write_self_signed`` for "localhost" (and 127.0.0.1); the account
``you@example.com`` is created with the real CLI while the server runs, and
``sales@example.com`` is an alias of it.  Clients that can check the certificate
do so, with the test certificate as their only trust anchor.
"""
import datetime
import email.utils
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import uuid

import pytest
from cryptography import x509

from mailsys.tls import write_self_signed
from tests.integration.harness import (HOSTNAME, LOOPBACK, TWISTD, HarnessError, MailsysServer,
                                       child_env, find_program, port_accepts, received_fields,
                                       split_received, tail, tls_server)

pytestmark = pytest.mark.integration

YOU = "you@example.com"
PASSWORD = "Subm1ssion-Test-Passw0rd"
JOE = "joe@example.com"                       # an account of the harness (users_text)
JOE_PASSWORD = "integration test password"
INVALID = (535, b"5.7.8 Authentication credentials invalid")
ENCRYPTION_REQUIRED = (538, b"5.7.11 Encryption required for requested authentication mechanism")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
NULL_REFUSED = (553, b"5.7.1 Sender address rejected: <> is not allowed on submission")
QUEUED = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\Z")


def need(program):
    path = find_program(program)
    if path is None:
        pytest.fail(f"{program} is not installed; the integration tests need the Debian package "
                    "(`bash .ci/test-all` installs it)")
    return path


@pytest.fixture(scope="module")
def msa(tmp_path_factory, users_text):
    """One server for the client tests of this module (each finds its message by queue ID)."""
    base = tmp_path_factory.mktemp("msa")
    servers = []

    def make(overrides=None, start=True, name=None):
        server = MailsysServer(base / (name or "mailsys"), overrides, users_text=users_text)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        server = tls_server(make, start=False)
        server.aliases_path.write_text("sales@example.com: you@example.com\n")
        server.start()
        # the account is added while the server runs: it must notice without a restart
        p = server.mailsys_cli("user", "add", YOU, "--password-stdin", input=PASSWORD + "\n")
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout == f"added {YOU}\n"
        time.sleep(1.1)
        yield server
    finally:
        for server in servers:
            server.cleanup()


def verifying_context(cafile):
    """Checks the server's certificate against the test certificate, host name included."""
    return ssl.create_default_context(cafile=str(cafile))


def spooled(server, qid):
    for entry in server.spool():
        if entry.queue_id == qid:
            return entry
    raise AssertionError(f"{qid} is not in the spool ({[e.queue_id for e in server.spool()]})")


def received_rx(qid, rcpt, helo=r"\S+", user=YOU):
    return re.compile(
        rf"Received: from {helo} \(localhost \[127\.0\.0\.1\]\) "
        rf"\(Authenticated sender: {re.escape(user)}\) "
        rf"by {re.escape(HOSTNAME)} \(mailsys\) with ESMTPSA id {qid} "
        rf"for <{re.escape(rcpt)}>; \w{{3}}, \d{{2}} \w{{3}} \d{{4}} \d\d:\d\d:\d\d [+-]\d{{4}}\Z")


def check_submitted(server, qid, role, *, sender=YOU, rcpt=JOE, marker=None, user=YOU):
    entry = spooled(server, qid)
    env = entry.envelope
    assert env["sender"] == sender
    assert [r["rcpt"] for r in env["recipients"]] == [rcpt]
    assert env["client"]["auth"] == user
    assert env["client"]["proto"] == "ESMTPSA"
    assert env["client"]["role"] == role
    message = entry.read_message()
    first = received_fields(message)[0]
    assert received_rx(qid, rcpt, user=user).match(first), first
    if marker is not None:
        assert marker.encode() in message
    return message


def queued_id(reply):
    code, text = reply
    assert code == 250, reply
    m = QUEUED.match(text)
    assert m, reply
    return m.group(1).decode()


def smtp_starttls(server, *, source=None, login=None, verify=True):
    client = smtplib.SMTP(LOOPBACK, server.submission_port, local_hostname="client.example.org",
                          timeout=30, source_address=(source, 0) if source else None)
    client.ehlo()
    client.starttls(context=verifying_context(server.certificate) if verify else None)
    client.ehlo()
    if login:
        client.login(*login)
    return client


def smtp_ssl(server, *, source=None, login=None):
    client = smtplib.SMTP_SSL(LOOPBACK, server.submissions_port, local_hostname="client.example.org",
                              timeout=30, context=verifying_context(server.certificate),
                              source_address=(source, 0) if source else None)
    client.ehlo()
    if login:
        client.login(*login)
    return client


def send(client, sender, rcpts, message):
    """MAIL, RCPT..., DATA by hand; returns the end-of-data reply."""
    assert client.mail(sender) == (250, b"2.1.0 Ok")
    for rcpt in rcpts:
        assert client.rcpt(rcpt) == (250, b"2.1.5 Ok")
    return client.data(message)


def simple_message(marker, extra=b""):
    return (b"From: you@example.com\r\nTo: joe@example.com\r\nSubject: " + marker.encode()
            + b"\r\n" + extra + b"\r\nbody of " + marker.encode() + b"\r\n")


# -- msmtp -------------------------------------------------------------------------------

def write_msmtprc(tmp_path, server, port, starttls, user=YOU, password=PASSWORD, trust=None):
    rc = tmp_path / f"msmtprc-{port}"
    rc.write_text(
        "defaults\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "account test\n"
        f"host {LOOPBACK}\n"
        f"port {port}\n"
        f"from {user}\n"
        "auth on\n"
        f"user {user}\n"
        f"password {password}\n"
        "tls on\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        f"tls_trust_file {trust or server.certificate}\n"
        "account default : test\n")
    rc.chmod(0o600)       # msmtp refuses a password file others can read
    return rc


def msmtp(rc, message, *rcpts, sender=YOU):
    p = subprocess.run([need("msmtp"), "-C", str(rc), "--debug", "-f", sender, *rcpts],
                       input=message, capture_output=True, timeout=60)
    return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("role", ["submission", "submissions"])
def test_msmtp_sends_through_both_ports(msa, tmp_path, role):
    port = msa.submission_port if role == "submission" else msa.submissions_port
    rc = write_msmtprc(tmp_path, msa, port, starttls=(role == "submission"))
    marker = f"msmtp-{role}-{uuid.uuid4().hex}"
    status, out = msmtp(rc, simple_message(marker).replace(b"\r\n", b"\n"), JOE)
    assert status == 0, out
    m = re.search(r"<-- 250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", out)
    assert m, out
    if role == "submission":
        assert "--> STARTTLS" in out and "<-- 220 2.0.0 Ready to start TLS" in out, out
    else:
        assert "--> STARTTLS" not in out
    assert "AUTH PLAIN" in out or "AUTH LOGIN" in out, out
    assert PASSWORD not in out
    check_submitted(msa, m.group(1), role, marker=marker)


def test_msmtp_with_a_wrong_password_fails(msa, tmp_path):
    rc = write_msmtprc(tmp_path, msa, msa.submissions_port, starttls=False, password="not-it")
    status, out = msmtp(rc, simple_message("msmtp-wrong").replace(b"\r\n", b"\n"), JOE)
    assert status != 0
    assert "535 5.7.8 Authentication credentials invalid" in out, out


def test_msmtp_refuses_a_server_whose_certificate_it_does_not_trust(msa, tmp_path):
    other = tmp_path / "other"
    write_self_signed("localhost", str(other / "cert.pem"), str(other / "key.pem"))
    rc = write_msmtprc(tmp_path, msa, msa.submission_port, starttls=True,
                       trust=other / "cert.pem")
    status, out = msmtp(rc, simple_message("msmtp-untrusted").replace(b"\r\n", b"\n"), JOE)
    assert status != 0, out
    assert "--> AUTH" not in out and "queued as" not in out, out


# -- swaks ---------------------------------------------------------------------------------

def swaks(server, port, *extra, marker, user=YOU, password=PASSWORD, auth="PLAIN"):
    argv = [need("swaks"), "--server", f"{LOOPBACK}:{port}", "--to", JOE, "--from", user,
            "--helo", "swaks.example.org", "--auth", auth, "--auth-user", user,
            "--auth-password", password, "--header", f"Subject: {marker}",
            "--body", f"body of {marker}", "--timeout", "30", *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("mode,auth", [("--tls", "PLAIN"), ("--tls", "LOGIN"),
                                       ("--tlsc", "PLAIN"), ("--tlsc", "LOGIN")])
def test_swaks_tls_and_tlsc(msa, mode, auth):
    port = msa.submission_port if mode == "--tls" else msa.submissions_port
    marker = f"swaks{mode}-{auth}-{uuid.uuid4().hex}"
    status, out = swaks(msa, port, mode, marker=marker, auth=auth)
    assert status == 0, out
    m = re.search(r"^<~ +250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)$", out, re.M)
    assert m, out
    assert re.search(r"^<~ +235 2\.7\.0 Authentication successful$", out, re.M), out
    if mode == "--tls":
        assert re.search(r"^<- +220 2\.0\.0 Ready to start TLS$", out, re.M), out
    message = check_submitted(msa, m.group(1), "submission" if mode == "--tls" else "submissions",
                              marker=marker)
    _, rest = split_received(message)
    assert b"\r\nSubject: " + marker.encode() + b"\r\n" in b"\r\n" + rest


def test_swaks_with_a_wrong_password(msa):
    status, out = swaks(msa, msa.submissions_port, "--tlsc", marker="swaks-wrong",
                        password="wrong-password")
    assert status != 0
    assert re.search(r"^<~\* +535 5\.7\.8 Authentication credentials invalid$", out, re.M), out


# -- smtplib -------------------------------------------------------------------------------

def test_smtplib_starttls_and_login(msa):
    client = smtp_starttls(msa, login=(YOU, PASSWORD))
    try:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        marker = f"smtplib-starttls-{uuid.uuid4().hex}"
        qid = queued_id(send(client, YOU, [JOE], simple_message(marker)))
    finally:
        client.quit()
    check_submitted(msa, qid, "submission", marker=marker)


def test_smtplib_ssl_and_login_with_login_mechanism(msa):
    client = smtp_ssl(msa)
    try:
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert not client.has_extn("starttls")
        challenges = []

        def login(challenge=None):
            challenges.append(challenge)
            return YOU if challenge in (None, b"Username:") else PASSWORD

        # smtplib sends the user name as the initial response, then answers "Password:"
        assert client.auth("LOGIN", login) == (235, b"2.7.0 Authentication successful")
        assert challenges == [None, b"Password:"]
        marker = f"smtplib-ssl-{uuid.uuid4().hex}"
        qid = queued_id(send(client, YOU, [JOE], simple_message(marker)))
    finally:
        client.quit()
    check_submitted(msa, qid, "submissions", marker=marker)


def test_ehlo_on_each_port(msa):
    # mta: STARTTLS, never AUTH (not even inside TLS)
    client = smtplib.SMTP(LOOPBACK, msa.port, timeout=30)
    try:
        client.ehlo("client.example.org")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=verifying_context(msa.certificate))
        client.ehlo("client.example.org")
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN") == (503, b"5.5.1 Error: authentication not enabled")
    finally:
        client.quit()
    # submission: STARTTLS, AUTH only inside TLS
    client = smtplib.SMTP(LOOPBACK, msa.submission_port, timeout=30)
    try:
        client.ehlo("client.example.org")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=verifying_context(msa.certificate))
        client.ehlo("client.example.org")
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
    finally:
        client.quit()


@pytest.mark.parametrize("role", ["submission", "submissions"])
@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_bad_credentials_get_535(msa, role, who):
    source = {"submission": {"wrong-password": "127.0.0.21", "unknown-user": "127.0.0.22"},
              "submissions": {"wrong-password": "127.0.0.23", "unknown-user": "127.0.0.24"}}[role][who]
    user, password = (YOU, "wrong password") if who == "wrong-password" else (
        "nobody@example.com", PASSWORD)
    client = smtp_starttls(msa, source=source) if role == "submission" else smtp_ssl(msa, source=source)
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            client.login(user, password)
        assert (e.value.smtp_code, e.value.smtp_error) == INVALID
        # not logged in: MAIL still needs authentication
        assert client.docmd("MAIL", f"FROM:<{YOU}>") == AUTH_REQUIRED
    finally:
        client.close()


def test_no_tls_no_auth(msa):
    client = smtplib.SMTP(LOOPBACK, msa.submission_port, timeout=30)
    try:
        client.ehlo("client.example.org")
        assert not client.has_extn("auth")
        token = "AHlvdUBleGFtcGxlLmNvbQBTdWJtMXNzaW9uLVRlc3QtUGFzc3cwcmQ="   # valid PLAIN for you
        assert client.docmd("AUTH", "PLAIN " + token) == ENCRYPTION_REQUIRED
        assert client.docmd("AUTH", "LOGIN") == ENCRYPTION_REQUIRED
        assert client.docmd("MAIL", f"FROM:<{YOU}>") == AUTH_REQUIRED
        assert client.docmd("RCPT", f"TO:<{JOE}>") == (503, b"5.5.1 Error: need MAIL command")
    finally:
        client.quit()


@pytest.mark.parametrize("role", ["submission", "submissions"])
def test_tls_but_no_auth_still_needs_auth(msa, role):
    client = smtp_starttls(msa) if role == "submission" else smtp_ssl(msa)
    try:
        assert client.docmd("MAIL", f"FROM:<{YOU}>") == AUTH_REQUIRED
        assert client.docmd("MAIL", "FROM:<>") == AUTH_REQUIRED
    finally:
        client.quit()


def test_failures_per_connection_then_421(msa):
    client = smtp_ssl(msa, source="127.0.0.25")
    try:
        for _ in range(2):
            assert client.docmd("AUTH", "PLAIN AHlvdUBleGFtcGxlLmNvbQB4") == INVALID
        assert client.docmd("AUTH", "PLAIN AHlvdUBleGFtcGxlLmNvbQB4") == INVALID
        assert client.getreply() == (421, f"4.7.0 {HOSTNAME} Error: too many failed "
                                          f"authentications".encode())
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()


def test_repeated_failures_from_one_ip_are_slowed_down(make_server):
    """The per-IP throttle across connections (one process: server.workers = 1, so the
    count is exact; docs/processes.rst: with more workers it is per worker)."""
    server = tls_server(make_server, {"server": {"workers": 1}}, roles=("submissions",))
    times = []
    for attempt in range(5):
        client = smtp_ssl(server, source="127.0.0.30")
        try:
            start = time.monotonic()
            assert client.docmd("AUTH", "PLAIN AGpvZUBleGFtcGxlLmNvbQB4") == INVALID
            times.append(time.monotonic() - start)
        finally:
            client.close()
    free, slowed = times[:3], times[3:]
    assert max(free) < 0.9, times
    assert 0.95 <= slowed[0] < 5 and 1.95 <= slowed[1] < 8, times
    # another address is not affected, and the right password still works from there
    client = smtp_ssl(server, source="127.0.0.31", login=(JOE, JOE_PASSWORD))
    client.quit()


# -- submission policy -----------------------------------------------------------------------

@pytest.fixture
def you(msa):
    client = smtp_ssl(msa, login=(YOU, PASSWORD))
    yield client
    client.close()


def test_every_refused_mail_command_is_logged(msa, you):
    """530 before AUTH and 553 for <> have their reject line too (only the
    sender-not-owned refusal had one)."""
    anonymous = smtp_ssl(msa)
    try:
        assert anonymous.docmd("MAIL", "FROM:<you@example.com>") == AUTH_REQUIRED
    finally:
        anonymous.close()
    assert msa.wait_for_log(r"NOQUEUE: reject: MAIL from \S+\[127\.0\.0\.1\]: 530 5\.7\.0 "
                            r"Authentication required; from=<you@example\.com> proto=ESMTP "
                            r"helo=<client\.example\.org>$")
    code, _ = you.docmd("MAIL", "FROM:<>")
    assert code == 553
    assert msa.wait_for_log(r"NOQUEUE: reject: MAIL from \S+\[127\.0\.0\.1\]: 553 5\.7\.1 "
                            r"[^;]*; from=<> proto=ESMTP helo=<client\.example\.org>$")


def test_sender_not_owned_is_553(msa, you):
    code, text = you.docmd("MAIL", "FROM:<bob@example.net>")
    assert (code, text) == (553, b"5.7.1 <bob@example.net>: Sender address rejected: not owned by "
                                 b"user you@example.com")
    # The log says what the wire said, with Postfix's from=/proto=/helo= as RCPT rejects have.
    assert msa.wait_for_log(r"NOQUEUE: reject: MAIL from \S+\[127\.0\.0\.1\]: 553 5\.7\.1 "
                            r"<bob@example\.net>: Sender address rejected: not owned by user "
                            r"you@example\.com; from=<bob@example\.net> proto=ESMTP helo=<\S+>$")
    assert you.docmd("MAIL", "FROM:<joe@example.com>")[0] == 553
    assert you.docmd("MAIL", "FROM:<you@example.org>")[0] == 553
    assert you.docmd("RCPT", f"TO:<{JOE}>") == (503, b"5.5.1 Error: need MAIL command")


def test_null_sender_is_refused_on_submission(you):
    assert you.docmd("MAIL", "FROM:<>") == NULL_REFUSED


@pytest.mark.parametrize("sender", ["sales@example.com", "you+lists@example.com"])
def test_owned_aliases_and_tags_are_accepted(msa, you, sender):
    marker = f"owned-{uuid.uuid4().hex}"
    qid = queued_id(send(you, sender, [JOE], simple_message(marker)))
    check_submitted(msa, qid, "submissions", sender=sender, marker=marker)


def test_relay_to_a_remote_domain_after_auth(msa, you):
    marker = f"relay-{uuid.uuid4().hex}"
    qid = queued_id(send(you, YOU, ["someone@remote.example"], simple_message(marker)))
    check_submitted(msa, qid, "submissions", rcpt="someone@remote.example", marker=marker)


def _added_headers(message):
    _, rest = split_received(message)
    return rest


DATE_RX = (rb"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct"
           rb"|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n")


@pytest.mark.parametrize("present", [(), ("Date",), ("Message-ID",), ("Date", "Message-ID"),
                                     ("date", "message-id"), ("DATE",)])
def test_message_id_and_date_added_when_missing(msa, you, present):
    marker = f"headers-{uuid.uuid4().hex}"
    own = b""
    if any(h.lower() == "date" for h in present):
        name = next(h for h in present if h.lower() == "date")
        own += name.encode() + b": Mon, 01 Jan 2024 10:00:00 +0100\r\n"
    if any(h.lower() == "message-id" for h in present):
        name = next(h for h in present if h.lower() == "message-id")
        own += name.encode() + b": <own-" + marker.encode() + b"@client.example>\r\n"
    original = simple_message(marker, own)
    qid = queued_id(send(you, YOU, [JOE], original))
    message = check_submitted(msa, qid, "submissions", marker=marker)
    rest = _added_headers(message)
    expected_added = b""
    before = datetime.datetime.now(datetime.timezone.utc)
    if not any(h.lower() == "date" for h in present):
        m = re.match(DATE_RX, rest)
        assert m, rest[:200]
        stamp = email.utils.parsedate_to_datetime(m.group(0)[6:-2].decode())
        assert abs((stamp - before).total_seconds()) < 120
        expected_added += m.group(0)
    if not any(h.lower() == "message-id" for h in present):
        expected_added += f"Message-ID: <{qid}@{HOSTNAME}>\r\n".encode()
    # exactly the missing header lines, before the message as the client sent it
    assert rest == expected_added + original


def test_headers_are_only_looked_for_in_the_header_section(msa, you):
    marker = f"body-headers-{uuid.uuid4().hex}"
    original = (b"From: you@example.com\r\nSubject: " + marker.encode() + b"\r\n\r\n"
                b"Date: not a header\r\nMessage-ID: <not-a-header@x>\r\n")
    qid = queued_id(send(you, YOU, [JOE], original))
    rest = _added_headers(check_submitted(msa, qid, "submissions"))
    m = re.match(DATE_RX + rb"Message-ID: <" + qid.encode() + rb"@" + HOSTNAME.encode() + rb">\r\n",
                 rest)
    assert m and rest[m.end():] == original, rest[:300]


@pytest.mark.parametrize("original", [
    b" leading-continuation\r\nSubject: fold\r\n\r\nb\r\n",    # would continue Message-ID
    b"just a body line\r\nsecond\r\n",                            # no header at all
    b"\r\nDate: in the body\r\nMessage-ID: <in-the-body@x>\r\n",   # empty header section
])
def test_what_is_added_never_changes_what_the_client_sent(msa, you, original):
    """A message that does not start with a header field is all body (RFC 5322
    2.1): the fields added before it end with a blank line, so a leading
    continuation line cannot extend the added Message-ID, nor a body line sit in
    the header section; and fields in the body are not taken for the header's."""
    qid = queued_id(send(you, YOU, [JOE], original))
    rest = _added_headers(check_submitted(msa, qid, "submissions"))
    m = re.match(DATE_RX + rb"Message-ID: <" + qid.encode() + rb"@" + HOSTNAME.encode() + rb">\r\n",
                 rest)
    assert m, rest[:300]
    blank = b"" if original.startswith(b"\r\n") else b"\r\n"
    assert rest[m.end():] == blank + original


def test_the_mta_port_keeps_a_leading_continuation_out_of_received(msa):
    client = smtplib.SMTP(LOOPBACK, msa.port, timeout=30)
    try:
        client.ehlo("client.example.org")
        original = b"\tby trusted.example with ESMTP id FORGED\r\nSubject: x\r\n\r\nb\r\n"
        qid = queued_id(send(client, "someone@remote.example", [JOE], original))
    finally:
        client.quit()
    received, rest = split_received(spooled(msa, qid).read_message())
    assert b"FORGED" not in received
    assert rest == b"\r\n" + original


def test_the_mta_port_adds_nothing(msa):
    """Date/Message-ID are the MSA's job (RFC 6409 8.1); the MTA passes mail as it is."""
    client = smtplib.SMTP(LOOPBACK, msa.port, timeout=30)
    try:
        client.ehlo("client.example.org")
        marker = f"mta-{uuid.uuid4().hex}"
        original = simple_message(marker)
        qid = queued_id(send(client, "someone@remote.example", [JOE], original))
    finally:
        client.quit()
    _, rest = split_received(spooled(msa, qid).read_message())
    assert rest == original


# -- certificates: none, then `mailsys tls self-signed`; reload without restart -------------------

def starttls_offered(port):
    client = smtplib.SMTP(LOOPBACK, port, timeout=30)
    try:
        client.ehlo("client.example.org")
        return client.has_extn("starttls")
    finally:
        client.quit()


def peer_certificate(port, starttls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if starttls:
        client = smtplib.SMTP(LOOPBACK, port, timeout=30)
        client.ehlo("client.example.org")
        client.starttls(context=ctx)
    else:
        client = smtplib.SMTP_SSL(LOOPBACK, port, timeout=30, context=ctx)
    try:
        return x509.load_der_x509_certificate(client.sock.getpeercert(binary_form=True))
    finally:
        client.quit()


def file_serial(path):
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_without_a_certificate_then_mailsys_tls_self_signed(make_server):
    server = tls_server(make_server, roles=("submission",), certificate=False)
    assert not server.certificate.exists()
    assert "no TLS certificate at" in server.log_text()
    for port in (server.port, server.submission_port):
        assert not starttls_offered(port)
    client = smtplib.SMTP(LOOPBACK, server.submission_port, timeout=30)
    try:
        client.ehlo("client.example.org")
        assert client.docmd("STARTTLS") == (502, b"5.5.1 Error: command not implemented")
        assert client.docmd("AUTH", "PLAIN") == ENCRYPTION_REQUIRED
    finally:
        client.quit()

    p = server.mailsys_cli("tls", "self-signed")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"wrote {server.certificate} and {server.key} for {HOSTNAME}\n"
    assert oct(server.key.stat().st_mode & 0o777) == oct(0o600)
    cert = x509.load_pem_x509_certificate(server.certificate.read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={HOSTNAME}"

    server.stop()
    server.start()
    for port in (server.port, server.submission_port):
        assert starttls_offered(port)
        assert peer_certificate(port, starttls=True).serial_number == cert.serial_number
    client = smtplib.SMTP(LOOPBACK, server.submission_port, timeout=30)
    try:
        client.ehlo("client.example.org")
        client.starttls(context=_trust(server.certificate))
        client.ehlo("client.example.org")
        client.login(JOE, JOE_PASSWORD)
    finally:
        client.quit()


def _trust(cafile):
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False          # the certificate names HOSTNAME; we connect to 127.0.0.1
    ctx.verify_mode = ssl.CERT_REQUIRED  # but its chain must verify against the file
    return ctx


def test_submissions_without_a_certificate_refuses_to_start(make_server):
    server = tls_server(make_server, roles=("submission", "submissions"), certificate=False,
                        start=False)
    with pytest.raises(HarnessError) as e:
        server.start(timeout=30)
    assert "twistd exited" in str(e.value)
    out = server.output_path.read_text(errors="replace") + server.log_text()
    assert "listen.submissions: implicit TLS needs a certificate and key" in out
    assert "Traceback" not in out
    assert "mailsys tls self-signed" in out


def test_certificate_reload_without_restart(make_server):
    server = tls_server(make_server)
    first = file_serial(server.certificate)
    ports = [(server.port, True), (server.submission_port, True), (server.submissions_port, False)]
    for port, starttls in ports:
        assert peer_certificate(port, starttls).serial_number == first
    pid = server.proc.pid

    write_self_signed("localhost", str(server.certificate), str(server.key))
    second = file_serial(server.certificate)
    assert second != first
    time.sleep(1.2)                    # the files are looked at once a second at most
    for port, starttls in ports:
        # each worker process reloads on its own next handshake: connect a few times
        for _ in range(4):
            assert peer_certificate(port, starttls).serial_number == second
    assert server.proc.pid == pid and server.running
    server.wait_for_log(r"TLS certificate reloaded from ")

    # a broken renewal keeps the last good certificate
    server.certificate.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    time.sleep(1.2)
    for port, starttls in ports:
        for _ in range(4):
            assert peer_certificate(port, starttls).serial_number == second
    server.wait_for_log(r"TLS reload failed, keeping the previous certificate")
    # and authentication still works over the kept certificate
    client = smtplib.SMTP_SSL(LOOPBACK, server.submissions_port, timeout=30,
                              context=_no_verify(server))
    try:
        client.login(JOE, JOE_PASSWORD)
    finally:
        client.quit()


def _no_verify(server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the embedded default: `twistd -n mailsys` with no configuration ------------------------------

EMBEDDED_PORTS = {"mta": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110, "pop3s": 2995}


def test_embedded_default_msmtp_through_587_and_465_styles(tmp_path):
    """CONTRACT section 4: a fresh `twistd -n mailsys`, an account from `mailsys user add`,
    and msmtp through the submission (2587, STARTTLS) and submissions (2465) ports with
    the certificate the server made itself on first start."""
    busy = [f"{role} {port}" for role, port in EMBEDDED_PORTS.items() if port_accepts(port, 0.5)]
    if busy:
        pytest.fail(f"the embedded default's ports are taken on 127.0.0.1 ({', '.join(busy)}); "
                    "stop whatever listens there")
    home = tmp_path / "dev"
    home.mkdir()
    log_path = home / "twistd.log"
    env = child_env()
    out = open(home / "twistd.out", "wb")
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", f"--logfile={log_path}", "mailsys"],
                            cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    try:
        deadline = time.monotonic() + 60
        while not (log_path.exists() and "mailsys started" in log_path.read_text(errors="replace")
                   and port_accepts(EMBEDDED_PORTS["submission"])):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"the embedded default did not start\n{tail(log_path)}\n"
                                   f"{tail(home / 'twistd.out')}")
            time.sleep(0.1)
        cert = home / "var" / "tls" / "fullchain.pem"
        assert cert.exists() and (home / "var" / "tls" / "privkey.pem").exists()
        p = subprocess.run([sys.executable, "-m", "mailsys", "user", "add", "you@localhost",
                            "--password-stdin"], input=PASSWORD + "\n", capture_output=True,
                           text=True, env=env, cwd=home, timeout=120)
        assert p.returncode == 0, p.stderr
        assert (home / "var" / "users").read_text().count("you@localhost:{ARGON2ID}") == 1
        time.sleep(1.1)
        ids = []
        for port, starttls in ((EMBEDDED_PORTS["submission"], True),
                               (EMBEDDED_PORTS["submissions"], False)):
            rc = tmp_path / f"msmtprc-{port}"
            rc.write_text(f"account default\nhost {LOOPBACK}\nport {port}\nfrom you@localhost\n"
                          f"auth on\nuser you@localhost\npassword {PASSWORD}\ntls on\n"
                          f"tls_starttls {'on' if starttls else 'off'}\ntls_trust_file {cert}\n")
            rc.chmod(0o600)
            marker = f"embedded-{port}-{uuid.uuid4().hex}"
            message = f"From: you@localhost\nTo: you@localhost\nSubject: {marker}\n\nhello\n"
            status, text = msmtp(rc, message.encode(), "you@localhost", sender="you@localhost")
            assert status == 0, text
            m = re.search(r"<-- 250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", text)
            assert m, text
            ids.append(m.group(1))
        deadline = time.monotonic() + 10
        while True:
            log = log_path.read_text(errors="replace")
            if all(re.search(rf"{qid}: client=localhost\[127\.0\.0\.1\]\n.*{qid}: from=<you@localhost>, "
                             rf"size=\d+, nrcpt=1 \(queued\)", log) for qid in ids):
                break
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.1)
        assert log.count("sasl_username=you@localhost") == 2, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- accounts: changes take effect without a restart ---------------------------------------------

def login_reply(server, user, password, source):
    client = smtp_ssl(server, source=source)
    try:
        try:
            return client.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error
    finally:
        client.close()


def test_passwd_and_del_take_effect_without_a_restart(msa):
    address = "changing@example.com"
    p = msa.mailsys_cli("user", "add", address, "--password-stdin", input="first-Password-1\n")
    assert p.returncode == 0, p.stderr
    time.sleep(1.1)
    assert login_reply(msa, address, "first-Password-1", "127.0.0.40") == (
        235, b"2.7.0 Authentication successful")
    p = msa.mailsys_cli("user", "passwd", address, "--password-stdin", input="second-Password-2\n")
    assert p.returncode == 0, p.stderr
    time.sleep(1.1)
    assert login_reply(msa, address, "first-Password-1", "127.0.0.41") == INVALID
    assert login_reply(msa, address, "second-Password-2", "127.0.0.42") == (
        235, b"2.7.0 Authentication successful")
    p = msa.mailsys_cli("user", "del", address)
    assert p.returncode == 0, p.stderr
    time.sleep(1.1)
    assert login_reply(msa, address, "second-Password-2", "127.0.0.43") == INVALID


def test_an_imported_dovecot_bcrypt_hash_logs_in(msa):
    import bcrypt

    address = "imported@example.com"
    hashed = bcrypt.hashpw(b"Dovecot-Imported-9", bcrypt.gensalt(rounds=5)).decode()
    line = f"{address}:{{BLF-CRYPT}}$2y${hashed[4:]}\n"
    text = msa.users_path.read_text()
    tmp = msa.users_path.with_name(".users.import")
    tmp.write_text(text + line)
    tmp.chmod(0o600)
    os.replace(tmp, msa.users_path)
    time.sleep(1.1)
    assert login_reply(msa, address, "Dovecot-Imported-9", "127.0.0.44") == (
        235, b"2.7.0 Authentication successful")
    assert login_reply(msa, address, "dovecot-imported-9", "127.0.0.45") == INVALID
