"""``mailsys queue ...``, ETRN and ``mailsys sendmail`` against a live server.

The default test server has no LMTP listener, so local mail stays deferred with a
known reason: exactly what the queue tools must show and steer.
"""
import json
import os
import re
import socket
import stat

import pytest

from tests.integration.harness import LOOPBACK, lmtp_overrides, lmtp_socket_path, wait_for_files

pytestmark = pytest.mark.integration

NO_LMTP = "451 4.3.5 No LMTP listener is configured (listen.lmtp is empty)"
QUIET = {"queue": {"retry_min": 3600, "retry_max": 3600}}


def send(server, sender, rcpts, subject):
    with server.smtp() as s:
        s.sendmail(sender, rcpts, f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")
    return server.wait_for_log(rf"([0-9A-F]+): from=<{re.escape(sender)}>, size=\d+, nrcpt=\d+ \(queued\)",
                               timeout=10)


def queue_ids(server, n):
    text = server.wait_for_log(r"(?s)" + r".*?status=deferred" * n, timeout=20)
    assert text
    return re.findall(r"([0-9A-F]{10,}): to=<[^>]*>, relay=lmtp, delay=[0-9.]+, dsn=4\.3\.5, "
                      r"status=deferred", server.log_text())


def cli(server, *argv, status=0):
    p = server.mailsys_cli(*argv)
    assert p.returncode == status, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def queued(make_server):
    server = make_server(QUIET)
    send(server, "alice@example.org", ["joe@example.com"], "first")
    send(server, "carol@example.org", ["joe@example.com", "bob@example.net"], "second")
    ids = []
    while len(set(ids)) < 2:
        ids = queue_ids(server, 3)
    first, second = sorted(set(ids))
    return server, first, second


def test_list_shows_each_message_and_each_recipients_last_error(queued):
    server, first, second = queued
    out = cli(server, "queue", "list").stdout.splitlines()
    assert len(out) == 6, out
    assert re.fullmatch(rf"{first} +\d+  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  <alice@example.org>  "
                        rf"\(deferred, next attempt \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)", out[0]), out[0]
    assert out[1] == f"    deferred  <joe@example.com>  ({NO_LMTP})"
    assert out[2].startswith(f"{second} ") and "<carol@example.org>" in out[2]
    assert out[3] == f"    deferred  <joe@example.com>  ({NO_LMTP})"
    assert out[4] == f"    deferred  <bob@example.net>  ({NO_LMTP})"
    assert re.fullmatch(r"-- 2 messages, \d+ bytes", out[5])

    data = json.loads(cli(server, "queue", "list", "--json").stdout)
    assert [m["id"] for m in data] == [first, second]
    assert data[1]["sender"] == "carol@example.org"
    assert data[1]["state"] == "deferred" and data[1]["attempts"] == 1
    assert [(r["address"], r["state"], r["error"], r["dsn"]) for r in data[1]["recipients"]] == [
        ("joe@example.com", "deferred", NO_LMTP, "4.3.5"),
        ("bob@example.net", "deferred", NO_LMTP, "4.3.5")]
    assert data[0]["size"] == len(server.spool()[0].read_message())


def test_show_prints_the_envelope_and_the_header(queued):
    server, first, _ = queued
    out = cli(server, "queue", "show", first).stdout
    assert "attempts: 1\n" in out
    assert "received from: localhost [127.0.0.1] via mta\n" in out
    assert f"recipient <joe@example.com>: deferred, dsn 4.3.5, last attempt " in out
    assert "\nSubject: first\n" in out
    assert f"by mx.mailsys.test (mailsys) with ESMTP id {first}" in out
    assert cli(server, "queue", "show", first.lower()).stdout == out     # ids in any case
    p = cli(server, "queue", "show", "ABCDEF0123", status=1)
    assert p.stderr == "mailsys: no message ABCDEF0123 in the queue\n"
    p = cli(server, "queue", "show", "../etc", status=2)
    assert p.stderr == "mailsys: '../etc' is not a queue id: use one that 'mailsys queue list' shows\n"
    # Two messages queued: one id is what show takes, and the server never saw the request.
    p = cli(server, "queue", "show", "ALL", status=2)
    assert (p.stdout, p.stderr) == ("", "mailsys: show takes one queue id, not ALL: 'mailsys queue "
                                        "list' shows every message\n")
    assert "Traceback" not in server.log_text() and "show failed" not in server.log_text()


def test_hold_release_delete_and_their_survival_of_a_restart(queued):
    server, first, second = queued
    assert cli(server, "queue", "hold", first).stdout == f"{first}: placed on hold\n"
    assert server.wait_for_log(rf"{first}: placed on hold")
    data = json.loads(cli(server, "queue", "list", "--json").stdout)
    assert [(m["id"], m["state"], m["next_attempt"]) for m in data][0] == (first, "held", None)
    # Already as asked: said so, a success (as postsuper -h passes over it).
    assert cli(server, "queue", "hold", first).stdout == f"message {first} is already on hold\n"
    assert cli(server, "queue", "release", second).stdout == f"message {second} is not on hold\n"

    assert cli(server, "queue", "delete", second).stdout == f"{second}: deleted\n"
    assert server.wait_for_log(rf"{second}: removed \(deleted by the administrator\)")

    server.stop()
    server.start()
    data = json.loads(cli(server, "queue", "list", "--json").stdout)
    assert [(m["id"], m["state"]) for m in data] == [(first, "held")]
    assert f"{first}: to=" not in server.log_since_start()       # held: no attempt at start

    assert cli(server, "queue", "release", first).stdout == f"{first}: released\n"
    assert server.wait_for_log(rf"{first}: released from hold")
    # Released: attempted at once (and deferred again, no LMTP here).
    assert server.wait_for_log(rf"(?s)released from hold.*{first}: to=<joe@example.com>, "
                               rf"relay=lmtp, .*status=deferred", timeout=10)
    assert [m["state"] for m in json.loads(cli(server, "queue", "list", "--json").stdout)] == ["deferred"]

    assert cli(server, "queue", "delete", "ALL").stdout == f"{first}: deleted\n"
    assert cli(server, "queue", "list").stdout == "Mail queue is empty\n"
    server.stop()
    server.start()
    assert cli(server, "queue", "list").stdout == "Mail queue is empty\n"


def test_flush_attempts_now_and_by_domain(queued):
    server, first, second = queued
    before = server.log_text().count("status=deferred")
    assert cli(server, "queue", "flush", "--domain", "example.org").stdout == \
        "0 messages scheduled for delivery now (domain example.org)\n"
    assert cli(server, "queue", "flush", "--domain", "@example.net").stdout == \
        "1 message scheduled for delivery now (domain example.net)\n"
    p = cli(server, "queue", "flush", "--domain", "bad..domain", status=2)
    assert p.stderr == ("mailsys: 'bad..domain' is not a domain name: give one such as example.com "
                        "or @example.com (both flush it and its subdomains)\n")
    server.wait_for_log(r"(?s)flush: 1 message\(s\) scheduled for example\.net.*"
                        rf"{second}: to=<bob@example\.net>.*status=deferred")
    assert cli(server, "queue", "flush").stdout == "2 messages scheduled for delivery now\n"
    server.wait_for_log(r"(?s)flush: 2 message\(s\) scheduled$" + r".*?status=deferred" * 3)
    assert server.log_text().count("status=deferred") == before + 2 + 3


def test_etrn_from_mynetworks_flushes_a_domain(queued):
    server, first, second = queued
    with socket.create_connection((LOOPBACK, server.port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"ETRN example.net\r\n")
        assert f.readline() == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
        s.sendall(b"EHLO client.example.org\r\n")
        lines = []
        while not lines or lines[-1][3:4] != b" ":
            lines.append(f.readline())
        assert b"250-ETRN\r\n" in lines
        s.sendall(b"ETRN #queue\r\nETRN bad..domain\r\nETRN @example.net\r\nQUIT\r\n")
        assert f.readline() == (b"458 4.3.0 Unable to queue messages for node #queue: "
                                b"queue names are not supported\r\n")
        assert f.readline() == b"501 5.5.4 Syntax: ETRN domain (a domain name)\r\n"
        assert f.readline() == b"250 2.0.0 Queuing for node example.net started\r\n"
        assert f.readline().startswith(b"221 2.0.0")
    server.wait_for_log(r"ETRN from localhost\[127\.0\.0\.1\]: example\.net")
    server.wait_for_log(rf"(?s)flush: 1 message\(s\) scheduled for example\.net.*"
                        rf"{second}: to=<bob@example\.net>.*status=deferred")


def test_etrn_is_refused_outside_mynetworks(make_server):
    server = make_server({"relay": {"mynetworks": []}})
    with socket.create_connection((LOOPBACK, server.port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"HELO client.example.org\r\nETRN example.com\r\nQUIT\r\n")
        assert f.readline().startswith(b"250 ")
        assert f.readline() == (b"459 4.7.1 <example.com>: Node not allowed: client not in "
                                b"relay.mynetworks\r\n")
    assert server.wait_for_log(r"reject: ETRN from localhost\[127\.0\.0\.1\]: 459 4\.7\.1 example\.com")
    assert "flush:" not in server.log_text()


def test_control_sockets_are_private_and_public_as_documented(server):
    control = server.state_dir / "control.sock"
    submit = server.state_dir / "public" / "submit.sock"
    assert stat.S_ISSOCK(control.stat().st_mode) and stat.S_IMODE(control.stat().st_mode) == 0o600
    assert stat.S_IMODE(submit.stat().st_mode) == 0o666
    assert stat.S_IMODE(server.state_dir.stat().st_mode) == 0o711
    assert stat.S_IMODE((server.state_dir / "spool").stat().st_mode) == 0o700
    # The public socket takes mail and nothing else.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(submit))
        s.sendall(b'{"cmd": "list"}\n')
        assert json.loads(s.makefile("rb").readline()) == {
            "ok": False, "error": "'list' is not allowed on this socket"}


def test_queue_commands_say_when_the_server_is_not_running(make_server):
    server = make_server(start=False)
    p = cli(server, "queue", "list", status=1)
    assert p.stderr == (f"mailsys: mailsys is not running (nothing answers on "
                        f"{server.state_dir}/control.sock: No such file or directory); start it "
                        f"with: twistd -n mailsys --config {server.config_path}\n")
    p = server.mailsys_cli("sendmail", "joe@example.com", input="Subject: x\n\nbody\n")
    assert p.returncode == 1
    assert p.stderr.endswith("the message was not sent\n")


@pytest.fixture
def delivering(tmp_path, make_server):
    return make_server(lmtp_overrides(lmtp_socket_path(tmp_path)))


def test_sendmail_t_ends_in_the_mailbox(delivering):
    server = delivering
    message = ("From: Cron Daemon <root@example.com>\nTo: Joe <joe@example.com>\n"
               "Bcc: bob@example.net\nSubject: cron output\n\nline one\n.\n..two dots\n")
    p = server.mailsys_cli("sendmail", "-t", "-oi", "-f", "root@example.com", input=message)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    joe = server.base / "mail" / "example.com" / "joe" / "Maildir"
    bob = server.base / "mail" / "example.net" / "bob" / "Maildir"
    assert len(wait_for_files(joe, 1, timeout=30)) == 1
    [data] = wait_for_files(bob, 1, timeout=30).values()
    head, _, body = data.partition(b"\n\n")
    assert body == b"line one\n.\n..two dots\n"
    assert b"\nBcc:" not in head and b"Subject: cron output" in head
    assert head.startswith(b"Return-Path: <root@example.com>\nDelivered-To: bob@example.net\n"
                           b"Received: by mx.mailsys.test (mailsys, from userid %d)\n\tid "
                           % os.getuid())
    assert re.search(rb"\nMessage-ID: <\d{14}\.[0-9a-f]{16}@mx\.mailsys\.test>", head)
    assert re.search(rb"\nDate: ", head)
    log = server.wait_for_log(r"([0-9A-F]+): uid=\d+\n.*\1: from=<root@example\.com>, size=\d+, "
                              r"nrcpt=2 \(queued\)")
    assert log


def test_sendmail_without_i_stops_at_a_dot_line_and_qualifies_addresses(delivering):
    server = delivering
    p = server.mailsys_cli("sendmail", "joe", input="Subject: dots\n\nkept\n.\nnot kept\n")
    assert (p.returncode, p.stderr) == (0, "")
    joe = server.base / "mail" / "example.com" / "joe" / "Maildir"
    [data] = wait_for_files(joe, 1, timeout=30).values()
    assert data.endswith(b"\n\nkept\n")
    login = __import__("pwd").getpwuid(os.getuid()).pw_name
    assert f"Return-Path: <{login}@example.com>".encode() in data
    assert f"\nFrom: {login}@example.com\n".encode() in data


def test_sendmail_refuses_bad_input_with_one_clear_sentence(delivering):
    server = delivering
    p = server.mailsys_cli("sendmail", "-t", input="Subject: no rcpt\n\nx\n")
    assert (p.returncode, p.stderr) == (2, "mailsys sendmail: no recipients: name them as "
                                           "arguments or use -t\n")
    p = server.mailsys_cli("sendmail", "a b@example.com", input="Subject: x\n\nx\n")
    assert p.returncode == 1
    assert p.stderr == ("mailsys sendmail: bad recipient address 'a b@example.com': Bad recipient "
                        "address syntax; the message was not sent\n")
    p = server.mailsys_cli("sendmail", "-bs", input="")
    assert p.returncode == 2 and "-bs is not supported" in p.stderr


def maildir(server, address):
    local, domain = address.split("@")
    return server.base / "mail" / domain / local / "Maildir"


def test_sendmail_as_debian_cron_runs_it_qualifies_the_header(delivering):
    """cron's exact command line and header: the receiver sees From and To
    with our domain (as Postfix's cleanup appends myorigin), the comment and
    every other field as cron wrote them."""
    server = delivering
    message = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n"
               "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
               "X-Cron-Env: <SHELL=/bin/sh>\n\ndone\n")
    p = server.mailsys_cli("sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem",
                           "bob@example.net", input=message)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    [data] = wait_for_files(maildir(server, "bob@example.net"), 1, timeout=30).values()
    head, _, body = data.partition(b"\n\n")
    assert b"\nFrom: root@example.com (Cron Daemon)\nTo: root@example.com\n" \
           b"Subject: Cron <root@host> run-parts\nMIME-Version: 1.0\n" \
           b"Content-Type: text/plain; charset=UTF-8\nX-Cron-Env: <SHELL=/bin/sh>\nDate: " in head
    assert body == b"done\n"


def test_sendmail_mbox_message_to_an_address_list_argument(delivering):
    """A message saved from an mbox (leading ``From `` line) keeps its header;
    one argument holding ``Name <addr>, ...`` reaches every address in it."""
    server = delivering
    p = server.mailsys_cli("sendmail", '"Joe, J." <joe@example.com>, Bob <bob@example.net>',
                           input="From root  Sat Nov 28 12:00:00 2026\nSubject: saved\n\nbody\n")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    for address in ("joe@example.com", "bob@example.net"):
        [data] = wait_for_files(maildir(server, address), 1, timeout=30).values()
        head, _, body = data.partition(b"\n\n")
        assert b"\nSubject: saved\n" in head and b"From root " not in data
        assert body == b"body\n"


def test_sendmail_t_sends_to_the_resent_fields(delivering):
    """-t on a resent message: Resent-To and Resent-Bcc are the recipients
    (not the original To), and Resent-Bcc is not delivered."""
    server = delivering
    message = ("From: ann@example.org\nTo: orig@example.org\nSubject: fwd\n"
               "Resent-From: root@example.com\nResent-To: Bob <bob@example.net>\n"
               "Resent-Bcc: joe\n\nbody\n")
    p = server.mailsys_cli("sendmail", "-t", "-i", "-f", "root@example.com", input=message)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert server.wait_for_log(r"([0-9A-F]+): uid=\d+\n.*\1: from=<root@example\.com>, size=\d+, "
                               r"nrcpt=2 \(queued\)")
    for address in ("joe@example.com", "bob@example.net"):
        [data] = wait_for_files(maildir(server, address), 1, timeout=30).values()
        assert b"\nResent-To: Bob <bob@example.net>\n" in data and b"Resent-Bcc" not in data


def test_sendmail_q_flushes_the_queue(queued):
    server = queued[0]
    p = server.mailsys_cli("sendmail", "-q")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert server.wait_for_log(r"flush: (\d+) message\(s\) scheduled").group(1) == "2"
    p = server.mailsys_cli("sendmail", "-q", "joe@example.com")
    assert (p.returncode, p.stderr) == (2, "mailsys sendmail: -q flushes the queue and takes no "
                                           "recipients\n")
    server.stop()
    p = server.mailsys_cli("sendmail", "-q")
    assert p.returncode == 1
    assert p.stderr.startswith(f"mailsys sendmail: mailsys is not running (nothing answers on "
                               f"{server.state_dir}/control.sock: ")
    assert re.search(r"; start it with: twistd -n mailsys --config \S+/mailsys\.toml\n\Z", p.stderr), p.stderr
    p = server.mailsys_cli("sendmail", "-q15m")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_any_local_user_may_submit_but_only_the_service_user_may_steer(users_text):
    """A process running as ``nobody`` (forked, so no exec of a Python it may not
    read) reaches public/submit.sock through the 0711 state directory, is named
    by its kernel uid, and is refused on control.sock by the file mode."""
    import shutil
    import tempfile

    from mailsys.control import request
    from tests.integration.harness import MailsysServer

    base = tempfile.mkdtemp(prefix="mailsys-uid-", dir="/tmp")
    os.chmod(base, 0o711)        # pytest's own tmp_path is private to root
    server = MailsysServer(base + "/m", QUIET, users_text=users_text)
    os.chmod(server.base, 0o711)
    try:
        server.start()
        nobody = 65534
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                              # the child: never returns into pytest
            status = 1
            try:
                os.close(read)
                os.setgid(nobody)
                os.setuid(nobody)
                try:
                    socket.socket(socket.AF_UNIX).connect(str(server.state_dir / "control.sock"))
                    result = "control: connected"
                except PermissionError:
                    result = "control: refused"
                message = b"Subject: from nobody\r\n\r\nhi\r\n"
                answer = request(str(server.state_dir / "public" / "submit.sock"),
                                 {"cmd": "submit", "sender": "", "recipients": ["joe@example.com"],
                                  "size": len(message)}, message)
                os.write(write, json.dumps([result, answer]).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        assert os.waitpid(pid, 0)[1] == 0
        result, answer = json.loads(data)
        assert result == "control: refused"
        assert answer["ok"] is True and re.fullmatch(r"[0-9A-F]+", answer["id"])
        server.wait_for_log(rf"{answer['id']}: uid={nobody}\n.*{answer['id']}: from=<>, size=\d+, nrcpt=1 \(queued\)")
        [entry] = [e for e in server.spool() if e.queue_id == answer["id"]]
        assert entry.read_message().startswith(
            f"Received: by mx.mailsys.test (mailsys, from userid {nobody})\r\n\tid {answer['id']}\r\n"
            f"\tfor <joe@example.com>; ".encode())
        assert entry.envelope["client"]["uid"] == nobody
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_sendmail_while_the_server_is_down_is_picked_up_at_start(make_server):
    server = make_server(QUIET)
    server.stop()
    p = server.mailsys_cli("sendmail", "-f", "cron@example.com", "joe@example.com",
                           input="Subject: nightly\n\nran fine\n")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    drops = os.listdir(server.state_dir / "maildrop")
    assert len(drops) == 1 and re.fullmatch(r"[0-9a-f]{32}\.drop", drops[0])
    assert stat.S_IMODE((server.state_dir / "maildrop").stat().st_mode) == 0o1733
    server.start()
    qid = server.wait_for_log(r"([0-9A-F]+): picked up from the maildrop \(uid \d+\)")
    assert qid
    assert os.listdir(server.state_dir / "maildrop") == []
    [m] = [m for m in json.loads(cli(server, "queue", "list", "--json").stdout)
           if m["sender"] == "cron@example.com"]
    assert [r["address"] for r in m["recipients"]] == ["joe@example.com"]
    [entry] = [e for e in server.spool() if e.queue_id == m["id"]]
    message = entry.read_message()
    assert message.startswith(f"Received: by mx.mailsys.test (mailsys, from userid {os.getuid()})"
                              f"\r\n\tid {m['id']}\r\n\tfor <joe@example.com>; ".encode())
    assert b"\r\nSubject: nightly\r\nFrom: cron@example.com\r\n" in message
    assert message.endswith(b"\r\n\r\nran fine\r\n")


def test_flush_and_etrn_attempt_a_destination_that_refused_a_moment_ago(make_server):
    """The remote courier takes a destination that refused every connection as
    down for 60 s; ``queue flush`` and ETRN, sent because it is back, must
    connect (docs/operations.rst), not defer again with "delivery temporarily
    suspended" and push the retry out."""
    from unittest import mock

    from tests.integration.harness import free_port, merge
    from tests.integration.scripted_smtp import ScriptedSMTP

    ports = {"down.test": free_port(), "later.test": free_port()}
    server = make_server(merge(QUIET, {"relay": {"outbound_tls": "none", "transport": {
        d: f"smtp:[{LOOPBACK}]:{p}" for d, p in ports.items()}}}))
    ids = {}
    for domain, port in ports.items():
        sender = f"alice@{domain.partition('.')[0]}.example.org"
        send(server, sender, [f"bob@{domain}"], domain)
        ids[domain] = server.wait_for_log(
            rf"([0-9A-F]+): to=<bob@{re.escape(domain)}>, relay=none, .*status=deferred "
            rf"\(connect to {LOOPBACK}\[{LOOPBACK}\]:{port}: Connection refused\)", timeout=20).group(1)
    peers = {}
    try:
        for domain, port in ports.items():     # both are back within the 60 s
            with mock.patch("tests.integration.scripted_smtp.free_port", return_value=port):
                peers[domain] = ScriptedSMTP().start()
        assert cli(server, "queue", "flush", "--domain", "@down.test").stdout == \
            "1 message scheduled for delivery now (domain down.test)\n"
        assert server.wait_for_log(rf"{ids['down.test']}: to=<bob@down\.test>, relay={LOOPBACK}"
                                   rf"\[{LOOPBACK}\]:{ports['down.test']}, .*status=sent", timeout=20)
        with socket.create_connection((LOOPBACK, server.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"HELO client.example.org\r\nETRN later.test\r\nQUIT\r\n")
            assert f.readline().startswith(b"250 ")
            assert f.readline() == b"250 2.0.0 Queuing for node later.test started\r\n"
        assert server.wait_for_log(rf"{ids['later.test']}: to=<bob@later\.test>, relay={LOOPBACK}"
                                   rf"\[{LOOPBACK}\]:{ports['later.test']}, .*status=sent", timeout=20)
    finally:
        for peer in peers.values():
            peer.stop()
    assert "delivery temporarily suspended" not in server.log_text()
    assert {d: [m[1] for m in p.messages] for d, p in peers.items()} == {
        "down.test": [["RCPT TO:<bob@down.test>"]], "later.test": [["RCPT TO:<bob@later.test>"]]}
