"""The whole local path with real processes: SMTP in on the mta port, the durable
spool, the queue, LMTP to our own MDA, a file in the Maildir; and the failure
paths: over quota is retried until it fits, a permanent failure comes back to
the sender as an RFC 3464 report in the sender's own mailbox."""
import email
import email.policy
import mailbox
import os
import re
import signal
import smtplib
import stat
import time

import pytest

from tests.integration.harness import (LOOPBACK, cli_users_text, lmtp_overrides,
                                       lmtp_socket_path, padded)

pytestmark = pytest.mark.integration

ACCOUNTS = [("joe@example.com", []), ("ann@example.com", ["--quota", "2000"]),
            ("sender@example.com", [])]


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def maildir(server, address):
    local, domain = address.split("@")
    return mailbox.Maildir(str(server.base / "mail" / domain / local / "Maildir"), factory=None,
                           create=False)


def count(server, address):
    try:
        return len(maildir(server, address))
    except (FileNotFoundError, mailbox.NoSuchMailboxError):
        return 0


@pytest.fixture
def host(tmp_path, make_server):
    sock = lmtp_socket_path(tmp_path)
    # Retries fast enough to watch: first retry after 1 s, then 2 s, 4 s.
    server = make_server(lmtp_overrides(sock, queue={"retry_min": 1, "retry_max": 4}), start=False)
    server.users_path.write_text(cli_users_text(ACCOUNTS))
    server.users_path.chmod(0o600)
    server.start()
    return server


def send(server, sender, rcpts, body):
    with smtplib.SMTP(LOOPBACK, server.port, timeout=30) as s:
        code, text = s.ehlo("client.example.org")
        assert code == 250
        refused = s.sendmail(sender, rcpts, body)
        assert refused == {}


def test_smtp_to_maildir(host):
    body = (b"From: Sender <sender@example.org>\r\nTo: joe@example.com\r\nSubject: e2e\r\n"
            b"Message-ID: <e2e-1@example.org>\r\n\r\nHello Joe.\r\n.leading dot\r\n")
    send(host, "sender@example.org", ["joe@example.com"], body)
    wait_for(lambda: count(host, "joe@example.com") == 1, what="delivery to joe")
    (stored,) = [m for m in maildir(host, "joe@example.com")]
    data = bytes(stored) if isinstance(stored, bytes) else stored.as_bytes()
    lines = data.split(b"\n")
    assert lines[0] == b"Return-Path: <sender@example.org>"
    assert lines[1] == b"Delivered-To: joe@example.com"
    assert lines[2].startswith(b"Received: from client.example.org (localhost [127.0.0.1])")
    assert data.endswith(body.replace(b"\r\n", b"\n").replace(b"\n.leading", b"\n.leading"))
    host.wait_for_log(r": removed$", timeout=30)
    assert host.wait_for_log(r"to=<joe@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=2\.0\.0, status=sent")


def test_over_quota_is_retried_then_delivered_when_room_is_made(host):
    big = b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n"
    send(host, "sender@example.org", ["ann@example.com"], big)
    host.wait_for_log(r"to=<ann@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=4\.2\.2, status=deferred",
                      timeout=30)
    assert count(host, "ann@example.com") == 0
    # The administrator raises the quota: the next retry delivers.
    text = host.users_path.read_text().replace("quota=2000", "quota=100000")
    host.users_path.write_text(text)
    wait_for(lambda: count(host, "ann@example.com") == 1, timeout=30, what="the retry")
    assert not re.search(r"relay=lmtp, .*status=bounced", host.log_text())    # the queue bounced nothing


def test_permanent_failure_bounces_to_the_senders_mailbox(host):
    body = b"Subject: to nowhere\r\nMessage-ID: <lost@example.com>\r\n\r\nlost\r\n"
    # Accepted at RCPT (the address is ours), refused by the MDA: make joe unknown
    # to the MDA by an alias pointing nowhere local.
    host.aliases_path.write_text("gone@example.com: nobody-here@example.com\n")
    with smtplib.SMTP(LOOPBACK, host.port, timeout=30) as s:
        s.ehlo("client.example.org")
        code, _ = s.mail("sender@example.com")
        assert code == 250
        code, text = s.rcpt("gone@example.com", options=["NOTIFY=FAILURE", "ORCPT=rfc822;gone@example.com"])
        assert code == 250, text
        code, text = s.data(body)
        assert code == 250, text
    wait_for(lambda: count(host, "sender@example.com") == 1, what="the bounce")
    (raw,) = [m for m in maildir(host, "sender@example.com")]
    report = email.message_from_bytes(raw if isinstance(raw, bytes) else raw.as_bytes(),
                                      policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; gone@example.com" in status
    assert "Original-Recipient: rfc822;gone@example.com" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    returned = parts[2].get_content()
    assert returned["Message-ID"] == "<lost@example.com>"
    log = host.log_text()
    # The report is queued like any message, and says so in the contract's words.
    report_id = re.search(r": sender failure notification: ([0-9A-F]+)$", log, re.M).group(1)
    assert re.search(rf"\] {report_id}: from=<>, size=\d+, nrcpt=1 \(queued\)$", log, re.M), log


def test_success_notice_for_an_alias_of_several_says_expanded(host):
    """RFC 3461 6.2.7.3: NOTIFY=SUCCESS for an alias that fans out to two
    mailboxes gets one notice, Action: expanded; each member gets its copy."""
    host.aliases_path.write_text("team@example.com: joe@example.com, ann@example.com\n")
    body = b"Subject: to the team\r\nMessage-ID: <team-1@example.com>\r\n\r\nhello team\r\n"
    with smtplib.SMTP(LOOPBACK, host.port, timeout=30) as s:
        s.ehlo("client.example.org")
        assert s.mail("sender@example.com", options=["RET=HDRS"])[0] == 250
        code, text = s.rcpt("team@example.com", options=["NOTIFY=SUCCESS"])
        assert code == 250, text
        assert s.data(body)[0] == 250
    wait_for(lambda: count(host, "sender@example.com") == 1, what="the success notice")
    assert count(host, "joe@example.com") == 1 and count(host, "ann@example.com") == 1
    (raw,) = [m for m in maildir(host, "sender@example.com")]
    report = email.message_from_bytes(raw if isinstance(raw, bytes) else raw.as_bytes(),
                                      policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = list(report.iter_parts())[1].as_string()
    assert "Final-Recipient: rfc822; team@example.com" in status
    assert "Action: expanded" in status
    assert "Status: 2.0.0" in status
    assert host.wait_for_log(r"to=<team@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=2\.0\.0, "
                             r"status=sent \(Ok: expanded to 2 recipients\)")


def worker_pids(server):
    """PIDs of the extra worker processes (children running mailsys.workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == server.proc.pid and b"mailsys.workers" in argv:
            pids.append(int(entry))
    return pids


@pytest.fixture
def two_workers(tmp_path, make_server):
    sock = lmtp_socket_path(tmp_path)
    server = make_server(lmtp_overrides(f"unix:{sock}:mode=0660", server={"workers": 2}),
                         start=False)
    server.lmtp_socket = sock
    server.users_path.write_text(cli_users_text(ACCOUNTS))
    server.users_path.chmod(0o600)
    server.start()
    return server


def test_the_queue_reaches_the_mda_workers_through_its_own_socket(two_workers):
    """With several processes the queue delivers through state/lmtp-queue.sock
    (0600, served by the other workers; docs/processes.rst), and local delivery
    goes on when that worker is killed: worker 0 serves the socket until the
    worker is back."""
    server = two_workers
    sock = server.state_dir / "lmtp-queue.sock"
    wait_for(lambda: len(worker_pids(server)) == 1, what="worker 1")
    # Worker 0 and then worker 1 log that they listen on the queue's socket.
    wait_for(lambda: len(re.findall(r"starting on '[^']*lmtp-queue\.sock'", server.log_text())) >= 2,
             what="worker 1 listening")
    # The modes survive the worker adopting the sockets (Twisted's adoption would
    # make them 0666: any local user could hand the MDA mail).
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(server.lmtp_socket).st_mode) == 0o660
    for i in range(3):
        send(server, "sender@example.org", ["joe@example.com"], f"Subject: {i}\r\n\r\nx\r\n".encode())
    wait_for(lambda: count(server, "joe@example.com") == 3, what="three deliveries")
    (pid,) = worker_pids(server)
    os.kill(pid, signal.SIGKILL)
    server.wait_for_log(r"worker 1 exited", timeout=10)
    for i in range(3, 6):
        send(server, "sender@example.org", ["joe@example.com"], f"Subject: {i}\r\n\r\nx\r\n".encode())
    wait_for(lambda: count(server, "joe@example.com") == 6, what="deliveries after the kill")
    assert len(re.findall(r"to=<joe@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=2\.0\.0, "
                          r"status=sent", server.log_text())) == 6
    assert "status=deferred" not in server.log_text()


def _segment_names(server):
    return sorted(os.listdir(os.path.join(server.state_dir, "spool", "segments")))


def test_a_finished_segment_is_removed_while_the_server_runs(host):
    """A message deferred across a restart keeps its old segment; once it is
    delivered, the old segment goes at once, without waiting for another restart
    (a server that runs for months must not keep every message it received)."""
    big = b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n"
    send(host, "sender@example.org", ["ann@example.com"], big)
    deferred = host.wait_for_log(r"(\w+): to=<ann@example\.com>, relay=lmtp, delay=[0-9.]+, "
                                 r"dsn=4\.2\.2, status=deferred", timeout=30)
    qid = deferred.group(1)
    before = _segment_names(host)
    [(segment, _)] = [(e.segment, e) for e in host.spool() if e.queue_id == qid]
    host.stop()
    host.start()
    after_restart = _segment_names(host)
    # Start-up deleted the empty segments and opened new ones; the deferred
    # message's segment stays, since the message is not done.
    assert os.path.basename(segment) in after_restart
    assert len(after_restart) >= 2 and after_restart != before
    text = host.users_path.read_text().replace("quota=2000", "quota=100000")
    host.users_path.write_text(text)
    wait_for(lambda: count(host, "ann@example.com") == 1, timeout=30, what="the retry")
    host.wait_for_log(rf"{qid}: removed", timeout=30)
    host.wait_for_log(rf"spool: removed segment {os.path.basename(segment)}: every message in it "
                      r"is done", timeout=10)
    assert os.path.basename(segment) not in _segment_names(host)
    assert count(host, "ann@example.com") == 1
    assert not re.search(r"relay=lmtp, .*status=bounced", host.log_text())    # the queue bounced nothing


def test_a_straggler_is_copied_forward_and_survives_kill9(host):
    """Eight messages delivered and one deferred share a segment; after a
    restart (which closes every segment it finds) the deferred one is the only
    thing keeping that file, so its next retry copies it into a new segment
    and the old file goes.  A kill -9 after that loses nothing: the restarted
    queue delivers it, from the copy, exactly once."""
    for n in range(8):
        send(host, "sender@example.org", ["joe@example.com"],
             f"Subject: small {n}\r\n\r\nhello\r\n".encode())
    big = b"Subject: big\r\nMessage-ID: <straggler@example.org>\r\n\r\n" + b"x" * 3000 + b"\r\n"
    send(host, "sender@example.org", ["ann@example.com"], big)
    deferred = host.wait_for_log(r"(\w+): to=<ann@example\.com>, relay=lmtp, delay=[0-9.]+, "
                                 r"dsn=4\.2\.2, status=deferred", timeout=30)
    qid = deferred.group(1)
    wait_for(lambda: count(host, "joe@example.com") == 8, what="joe's eight")
    [segment] = {os.path.basename(e.segment) for e in host.spool() if e.queue_id == qid}
    assert len([e for e in host.spool() if os.path.basename(e.segment) == segment]) == 9
    host.stop()
    host.start()
    moved = host.wait_for_log(rf"{qid}: copied forward from {segment} to (\S+)$", timeout=30)
    host.wait_for_log(rf"spool: removed segment {segment}: every message in it is done", timeout=10)
    assert segment not in _segment_names(host)
    copies = [e for e in host.spool() if e.queue_id == qid]
    assert [os.path.basename(e.segment) for e in copies] == [moved.group(1)]
    assert copies[0].read_message().endswith(big)
    host.kill9()
    host.start()
    text = host.users_path.read_text().replace("quota=2000", "quota=100000")
    host.users_path.write_text(text)
    wait_for(lambda: count(host, "ann@example.com") == 1, timeout=30, what="the retry")
    host.wait_for_log(rf"{qid}: removed", timeout=30)
    time.sleep(1.5)      # a second delivery, if there were one, would come within the retry time
    assert count(host, "ann@example.com") == 1
    assert count(host, "joe@example.com") == 8
    (stored,) = list(maildir(host, "ann@example.com"))
    data = bytes(stored) if isinstance(stored, bytes) else stored.as_bytes()
    assert data.endswith(big.replace(b"\r\n", b"\n"))
    assert not re.search(r"relay=lmtp, .*status=bounced", host.log_text())    # the queue bounced nothing


def test_sigusr1_rotates_the_log_of_a_running_server(two_workers):
    """``kill -USR1`` makes twistd rotate its log file now (FILE -> FILE.1); the
    lines of both processes, worker 1's relayed through worker 0 and written once
    per reactor turn (mailsys.logs.TurnBufferedFile), go on in the new file and
    none is lost or split between the two."""
    server = two_workers
    log, rotated = server.log_path, server.log_path.with_name(server.log_path.name + ".1")

    def one(n):
        with smtplib.SMTP(LOOPBACK, server.port, timeout=30) as s:
            s.ehlo("client.example.org")
            s.mail("sender@example.org")
            s.rcpt("joe@example.com")
            code, text = s.data(f"Subject: rotation {n}\r\n\r\nhi\r\n".encode())
        assert code == 250, text
        wait_for(lambda: count(server, "joe@example.com") == n, what=f"message {n}")
        return re.fullmatch(rb"2\.0\.0 Ok: queued as (\w+)", text).group(1).decode()

    first = one(1)
    server.wait_for_log(rf"{first}: removed$", timeout=30)
    assert not rotated.exists()
    os.kill(server.proc.pid, signal.SIGUSR1)
    wait_for(rotated.exists, what="the rotation")
    second = one(2)
    server.wait_for_log(rf"{second}: removed$", timeout=30)
    old, new = rotated.read_text(), log.read_text()
    for text, qid, other in ((old, first, second), (new, second, first)):
        assert re.search(rf"\] {qid}: client=localhost\[127\.0\.0\.1\]\n.*\] {qid}: from=<sender@example\.org>, "
                         rf"size=\d+, nrcpt=1 \(queued\)\n", text)
        assert re.search(rf"\] {qid}: to=<joe@example\.com>, relay=lmtp, .*status=sent", text)   # worker 0's queue
        assert re.search(rf"\] {qid}: removed\n", text)
        assert other not in text
        # worker 1's MDA (its own transaction id), relayed through worker 0
        assert len(re.findall(r"\[mailsys\.lmtp#info\] \w+: to=<joe@example\.com>, relay=local, .*status=sent",
                              text)) == 1
    for text in (old, new):
        assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[", line) or line.startswith("\t")
                   for line in text.splitlines()), text[-2000:]
    assert server.running


def sized(n, subject, headers=b""):
    return padded(b"Subject: " + subject + b"\r\n" + headers + b"\r\n", n)


def test_a_message_at_the_size_limit_is_delivered_and_its_bounce_arrives(tmp_path, make_server):
    """``250`` at the limit means delivered: the Received field and a report
    quoting the original make them bigger than limits.message_size, and the
    MDA's LMTP takes them (it has mailsys.mda.lmtp.SIZE_HEADROOM more).  With
    the bare limit the first message was bounced by our own MDA with 552 5.3.4
    and the report of the second (from <>) was dropped."""
    limit = 10000
    server = make_server(lmtp_overrides(lmtp_socket_path(tmp_path), limits={"message_size": limit}),
                         start=False)
    server.users_path.write_text(cli_users_text(ACCOUNTS))
    server.users_path.chmod(0o600)
    server.aliases_path.write_text("gone@example.com: nobody-here@example.com\n")
    server.start()
    at_limit = sized(limit, b"at the limit")
    send(server, "sender@example.org", ["joe@example.com"], at_limit)
    wait_for(lambda: count(server, "joe@example.com") == 1, what="delivery at the limit")
    (stored,) = [bytes(m) for m in maildir(server, "joe@example.com")]
    assert len(stored) > limit and stored.endswith(at_limit.replace(b"\r\n", b"\n"))
    server.wait_for_log(r"to=<joe@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=2\.0\.0, status=sent")

    with smtplib.SMTP(LOOPBACK, server.port, timeout=30) as s:
        s.ehlo("client.example.org")
        assert s.mail("sender@example.com", options=["RET=FULL"])[0] == 250
        assert s.rcpt("gone@example.com")[0] == 250
        code, text = s.data(sized(limit, b"returned whole", b"Message-ID: <whole@example.com>\r\n"))
        assert code == 250, text
    wait_for(lambda: count(server, "sender@example.com") == 1, what="the report")
    (raw,) = [bytes(m) for m in maildir(server, "sender@example.com")]
    assert len(raw) > limit
    report = email.message_from_bytes(raw, policy=email.policy.default)
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert parts[2].get_content()["Message-ID"] == "<whole@example.com>"
    log = server.log_text()
    assert "5.3.4" not in log
    assert "status=bounced" in log      # gone@, and nothing else
    assert len(re.findall(r"status=bounced", log)) == 1, log


def report_of(raw):
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    return report, list(report.iter_parts())[1].as_string()


def test_an_unknown_alias_member_bounces_and_a_loop_is_named(host):
    """A typo in the aliases file: the members that exist get their copies, the
    one that is nobody comes back to the sender as a report naming it (with the
    alias as Original-Recipient), and the log says why.  An alias that loops is
    refused as a loop (5.4.6).  Before, the unknown member vanished without a
    line in the log, and a loop bounced as "User unknown"."""
    host.aliases_path.write_text("partial@example.com: joe, ghost\n"
                                 "loop1@example.com: loop2@example.com\n"
                                 "loop2@example.com: loop1@example.com\n")
    send(host, "sender@example.com", ["partial@example.com"],
         b"Subject: to partial\r\nMessage-ID: <partial@example.com>\r\n\r\nhi\r\n")
    wait_for(lambda: count(host, "joe@example.com") == 1, what="joe's copy")
    wait_for(lambda: count(host, "sender@example.com") == 1, what="the report for ghost")
    (raw,) = [bytes(m) for m in maildir(host, "sender@example.com")]
    _, status = report_of(raw)
    assert "Final-Recipient: rfc822; ghost@example.com" in status
    assert "Original-Recipient: rfc822;partial@example.com" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert host.wait_for_log(r"warning: alias expansion of <partial@example\.com>: "
                             r"partial@example\.com -> ghost@example\.com: no such local user or alias$")
    assert host.wait_for_log(r"to=<ghost@example\.com>, relay=lmtp, delay=[0-9.]+, dsn=5\.1\.1, "
                             r"status=bounced ")

    send(host, "sender@example.com", ["loop1@example.com"],
         b"Subject: to loop1\r\nMessage-ID: <loop1@example.com>\r\n\r\nhi\r\n")
    wait_for(lambda: count(host, "sender@example.com") == 2, what="the report for the loop")
    reports = [report_of(bytes(m)) for m in maildir(host, "sender@example.com")]
    (status,) = [st for _, st in reports if "loop1@example.com" in st]
    assert "Final-Recipient: rfc822; loop1@example.com" in status
    assert "Status: 5.4.6" in status
    assert ("Diagnostic-Code: smtp; 554 5.4.6 <loop1@example.com>: Alias loop:\n"
            " loop1@example.com -> loop2@example.com -> loop1@example.com") in status, status
    assert count(host, "joe@example.com") == 1
