"""``mailsys sendmail``: flags, stdin handling and header completion (no server)."""
import io
from types import SimpleNamespace

import pytest

from mailsys.cli import CommandError
from mailsys.sendmail import (compose, dsn_request, extract_recipients, fields, parse_argv,
                              read_message, split_header)

CONFIG = SimpleNamespace(domains=SimpleNamespace(local=("example.com",)),
                         server=SimpleNamespace(hostname="mx.example.com"))


def test_flags_as_cron_mailx_and_php_pass_them():
    opts, rcpts = parse_argv(["-t", "-i", "-fcron@example.com", "-FCron Daemon", "-odi", "-oem",
                              "-v", "joe", "ann@example.net, bob"])
    assert (opts["extract"], opts["dots"], opts["sender"], opts["fullname"]) == \
        (True, False, "cron@example.com", "Cron Daemon")
    assert rcpts == ["joe", "ann@example.net", "bob"]
    opts, rcpts = parse_argv(["-oi", "-f", "a@b.c", "-r", "d@e.f", "--", "-odd@example.com"])
    assert (opts["dots"], opts["sender"], rcpts) == (False, "d@e.f", ["-odd@example.com"])
    assert parse_argv(["-bp"])[0]["mode"] == "p"
    assert parse_argv(["--config", "/x.toml", "joe"])[0]["config"] == "/x.toml"


def test_each_recipient_argument_is_an_address_list():
    """As Postfix's sendmail: ``'Name <addr>'`` and quoted commas work; what
    is no address list goes on as written, for the server to refuse."""
    _, rcpts = parse_argv(["Carol <carol@example.com>", '"Doe, J" <jd@example.org>, ann (Ann)',
                           "a b@example.com", " "])
    assert rcpts == ["carol@example.com", "jd@example.org", "ann", "a b@example.com"]


@pytest.mark.parametrize("argv, mode, flush, interval", [
    (["-q"], "q", "", None),
    (["-q", "--config", "/x.toml"], "q", "", None),
    (["-qRexample.net"], "q", "example.net", None),
    (["-q15m"], "m", None, "15m"),
    (["-q1h", "-t"], "m", None, "1h"),
])
def test_q_forms_as_postfix_reads_them(argv, mode, flush, interval):
    opts, rcpts = parse_argv(argv)
    assert (opts["mode"], opts["flush"], opts["interval"], rcpts) == (mode, flush, interval, [])


def test_q_interval_does_nothing():
    """``-q15m`` exits 0 at once: no stdin, no configuration, no server."""
    from mailsys.sendmail import run

    class Unreadable(io.BytesIO):
        def read(self, *a):
            raise AssertionError("stdin was read")

    assert run(["-q15m", "-t", "--config", "/nonexistent/mailsys.toml"], stdin=Unreadable()) == 0


@pytest.mark.parametrize("argv, error", [
    (["-bs"], "-bs is not supported (use -bm, -bp or -bi)"),
    (["-f"], "option -f needs a value"),
    (["-Z"], "unknown option -Z"),
    (["-qR"], "-qR needs a site, as in -qRexample.com"),
    (["-qIABC"], "-qI is not supported (use -q, -qRSITE or -qINTERVAL)"),
])
def test_bad_flags_are_usage_errors(argv, error):
    with pytest.raises(CommandError) as e:
        parse_argv(argv)
    assert (str(e.value), e.value.status) == (error, 2)


@pytest.mark.parametrize("data, dots, expected", [
    (b"a\nb\n", True, b"a\r\nb\r\n"),
    (b"a\n.\nb\n", True, b"a\r\n"),
    (b"a\n.\nb\n", False, b"a\r\n.\r\nb\r\n"),
    (b".\nb\n", True, b""),
    (b"a\n.", True, b"a\r\n"),
    (b"a\r\n..\r\nno end", True, b"a\r\n..\r\nno end\r\n"),
    (b"bare\rcr\n", True, b"bare\r\ncr\r\n"),
])
def test_stdin_line_ends_and_the_dot_line(data, dots, expected):
    assert read_message(io.BytesIO(data), 1000, dots) == expected


@pytest.mark.parametrize("data, dots, expected", [
    (b"From root  Sat Nov 28 12:00:00 2026\nSubject: s\n\nb\n", True, b"Subject: s\r\n\r\nb\r\n"),
    (b"From a Sat\r\n>From b Sat\r\nTo: x\r\n\r\nFrom here\r\n", False,
     b"To: x\r\n\r\nFrom here\r\n"),
    (b"From root Sat\n.\nSubject: s\n", True, b""),
    (b"From root", True, b""),
    (b"From: root\n\nb\n", True, b"From: root\r\n\r\nb\r\n"),
])
def test_leading_mbox_from_lines_are_dropped(data, dots, expected):
    """Postfix's sendmail skips leading ``From `` (and ``>From ``) lines, so
    a message saved from an mbox keeps its header (and Subject)."""
    assert read_message(io.BytesIO(data), 1000, dots) == expected


def test_stdin_over_the_size_limit_is_refused():
    with pytest.raises(CommandError) as e:
        read_message(io.BytesIO(b"x" * 11), 10, True)
    assert str(e.value) == "message too big: more than limits.message_size (10 bytes)"


def test_a_message_without_a_header_gets_one():
    header, body = split_header(b"just text\r\nmore\r\n")
    assert header == [] and body == b"just text\r\nmore\r\n"
    sender, rcpts, message = compose({"extract": False, "sender": None, "fullname": None},
                                     ["joe"], b"just text\r\n", CONFIG, "www-data")
    assert (sender, rcpts) == ("www-data@example.com", ["joe@example.com"])
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"From: www-data@example.com"
    assert lines[1].startswith(b"Date: ") and lines[2].startswith(b"Message-ID: <")
    assert body == b"just text\r\n"


def test_t_takes_to_cc_bcc_and_removes_bcc():
    message = (b"To: Joe <joe@example.com>, ann\r\nCc: \"B, O\" <bob@example.net>\r\n"
               b"Bcc: secret@example.org,\r\n other@example.org\r\nFrom: me@example.com\r\n"
               b"Date: x\r\nMessage-ID: <1@x>\r\nSubject: s\r\n\r\nbody\r\n")
    sender, rcpts, out = compose({"extract": True, "sender": "me", "fullname": "Me"},
                                 ["extra@example.org"], message, CONFIG, "root")
    assert sender == "me@example.com"
    assert rcpts == ["extra@example.org", "joe@example.com", "ann@example.com", "bob@example.net",
                     "secret@example.org", "other@example.org"]
    assert out == (b"To: Joe <joe@example.com>, ann@example.com\r\nCc: \"B, O\" <bob@example.net>\r\n"
                   b"From: me@example.com\r\nDate: x\r\nMessage-ID: <1@x>\r\nSubject: s\r\n\r\nbody\r\n")


def test_bare_addresses_in_the_header_get_the_domain():
    """Debian cron's message: the header's bare local parts get @DOMAIN (as
    Postfix's cleanup appends myorigin); names, comments, folding, qualified
    addresses, groups, unparseable fields and other fields stay as written."""
    message = (b"From: root (Cron Daemon)\r\nTo: root\r\nCc: \"Ops, night\" <ops>,\r\n"
               b"\tbob@example.net\r\nReply-To: Team: ann, bob;\r\nSender: Bad Sender x\r\n"
               b"Resent-From: \xc3\xa9lodie <el>\r\nX-Cron-Env: <HOME=/root>\r\n"
               b"Subject: root\r\n\r\nTo: root\r\n")
    sender, rcpts, out = compose({"extract": False, "sender": None, "fullname": "CronDaemon"},
                                 ["admin@remote.example"], message, CONFIG, "root")
    assert (sender, rcpts) == ("root@example.com", ["admin@remote.example"])
    assert out.startswith(
        b"From: root@example.com (Cron Daemon)\r\nTo: root@example.com\r\n"
        b"Cc: \"Ops, night\" <ops@example.com>,\r\n\tbob@example.net\r\n"
        b"Reply-To: Team: ann, bob;\r\nSender: Bad Sender x\r\n"
        b"Resent-From: \xc3\xa9lodie <el@example.com>\r\nX-Cron-Env: <HOME=/root>\r\n"
        b"Subject: root\r\nDate: ")
    assert out.endswith(b"\r\n\r\nTo: root\r\n")


def test_bare_addresses_in_notice_fields_get_the_domain():
    """Fields a reply or a report goes to are qualified too; others that only
    look like addresses (Message-ID, In-Reply-To) are not."""
    message = (b"From: root\r\nErrors-To: root\r\nReturn-Receipt-To: ops\r\n"
               b"Apparently-To: joe\r\nDisposition-Notification-To: Ann <ann>\r\n"
               b"In-Reply-To: <x>\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nb\r\n")
    _, _, out = compose({"extract": False, "sender": None, "fullname": None}, ["joe"],
                        message, CONFIG, "root")
    assert out == (b"From: root@example.com\r\nErrors-To: root@example.com\r\n"
                   b"Return-Receipt-To: ops@example.com\r\nApparently-To: joe@example.com\r\n"
                   b"Disposition-Notification-To: Ann <ann@example.com>\r\n"
                   b"In-Reply-To: <x>\r\nMessage-ID: <1@x>\r\nDate: x\r\n\r\nb\r\n")


def test_gateway_submission_keeps_the_header():
    """-G (relayed mail), as Postfix with no remote_header_rewrite_domain:
    the header stays as written; the envelope is still qualified."""
    opts, rcpts = parse_argv(["-G", "-f", "root", "joe"])
    _, envelope, out = compose(opts, rcpts, b"From: root\r\nTo: joe\r\n\r\nb\r\n", CONFIG, "x")
    assert envelope == ["joe@example.com"] and out.startswith(b"From: root\r\nTo: joe\r\nDate: ")


def test_t_takes_resent_fields_when_there_are_any():
    """RFC 5322 3.6.6 and Postfix's sendmail -t: Resent-To/Cc/Bcc name the
    recipients of a resent message; To/Cc/Bcc are then the original's.
    Resent-Bcc goes, as Bcc does."""
    message = (b"From: ann@example.com\r\nTo: orig@example.org\r\nCc: orig2@example.org\r\n"
               b"Resent-From: me@example.com\r\nResent-To: Joe <joe>\r\n"
               b"Resent-Cc: cc@example.net\r\nResent-Bcc: hidden@example.net,\r\n hidden2\r\n"
               b"Date: x\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n")
    _, rcpts, out = compose({"extract": True, "sender": "me", "fullname": None},
                            ["extra@example.org"], message, CONFIG, "root")
    assert rcpts == ["extra@example.org", "joe@example.com", "cc@example.net",
                     "hidden@example.net", "hidden2@example.com"]
    assert out == (b"From: ann@example.com\r\nTo: orig@example.org\r\nCc: orig2@example.org\r\n"
                   b"Resent-From: me@example.com\r\nResent-To: Joe <joe@example.com>\r\n"
                   b"Resent-Cc: cc@example.net\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n")


def test_t_refuses_a_field_it_cannot_read():
    header, _ = split_header(b"To: Joe Smith joe@example.com\r\n\r\nb\r\n")
    with pytest.raises(CommandError) as e:
        extract_recipients(fields(header))
    assert (str(e.value), e.value.status) == (
        "the To field is no readable address list ('Joe Smith joe@example.com'); fix it or "
        "name the recipients as arguments; the message was not sent", 1)


def test_full_name_and_null_sender():
    sender, _, out = compose({"extract": False, "sender": "", "fullname": "Cron Daemon"},
                             ["joe"], b"Subject: s\r\n\r\nb\r\n", CONFIG, "root")
    assert sender == ""
    assert b"\r\nFrom: Cron Daemon <MAILER-DAEMON@example.com>\r\n" in out


@pytest.mark.parametrize("value,sender", [
    ("Cron Daemon <cron@example.org>", "cron@example.org"),   # Postfix takes the mailbox's address
    ('"Joe" <joe@example.org>, ann@example.org', "joe@example.org"),
    ("root", "root@example.com"),
    ("<>", ""),
    ("a b@example.org", "a b@example.org"),          # unreadable: passed on for the server to refuse
])
def test_f_takes_the_address_of_its_first_mailbox(value, sender):
    got, _, _ = compose({"extract": False, "sender": value, "fullname": None},
                        ["joe"], b"Subject: s\r\n\r\nb\r\n", CONFIG, "root")
    assert got == sender


def test_dsn_flags():
    assert dsn_request({"notify": "success,delay", "ret": "hdrs", "envid": "Q1"}) == {
        "notify": ["SUCCESS", "DELAY"], "ret": "HDRS", "envid": "Q1"}
    with pytest.raises(CommandError):
        dsn_request({"notify": "never,success", "ret": None, "envid": None})


@pytest.mark.parametrize("flag", ["-bi", "-bd"])
def test_newaliases_and_daemon_mode_do_nothing(flag):
    """``-bi`` (aliases reload themselves) and ``-bd`` (the daemon is twistd) exit 0
    without reading a message from stdin or needing a configuration."""
    from mailsys.sendmail import run

    class Unreadable(io.BytesIO):
        def read(self, *a):
            raise AssertionError("stdin was read")

    assert run([flag, "--config", "/nonexistent/mailsys.toml"], stdin=Unreadable()) == 0


def test_with_the_server_down_and_no_maildrop_the_hint_names_the_configuration(tmp_path):
    """The server never ran with this configuration (no control socket, no
    maildrop): the error says how to start the server that reads it."""
    import io

    from mailsys.sendmail import run
    from tests.helpers import write_host_config

    path = write_host_config(tmp_path)
    with pytest.raises(CommandError) as e:
        run(["--config", str(path), "joe"], stdin=io.BytesIO(b"Subject: s\n\nb\n"))
    text = str(e.value)
    assert text.startswith(f"mailsys is not running (nothing answers on {tmp_path}/state/public/"
                           f"submit.sock: No such file or directory); start it with: "
                           f"twistd -n mailsys --config {path}, and the maildrop "), text
    assert text.endswith("is not usable (No such file or directory); the message was not sent")
