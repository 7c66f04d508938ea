"""``mailsys sendmail``: flags, stdin handling and header completion (no server)."""
import io
from types import SimpleNamespace

import pytest

from mailsys.cli import CommandError
from mailsys.sendmail import compose, dsn_request, parse_argv, read_message, split_header

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


@pytest.mark.parametrize("argv, error", [
    (["-bs"], "-bs is not supported (use -bm, -bp or -bi)"),
    (["-f"], "option -f needs a value"),
    (["-Z"], "unknown option -Z"),
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
    assert out == (b"To: Joe <joe@example.com>, ann\r\nCc: \"B, O\" <bob@example.net>\r\n"
                   b"From: me@example.com\r\nDate: x\r\nMessage-ID: <1@x>\r\nSubject: s\r\n\r\nbody\r\n")


def test_full_name_and_null_sender():
    sender, _, out = compose({"extract": False, "sender": "", "fullname": "Cron Daemon"},
                             ["joe"], b"Subject: s\r\n\r\nb\r\n", CONFIG, "root")
    assert sender == ""
    assert b"\r\nFrom: Cron Daemon <MAILER-DAEMON@example.com>\r\n" in out


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
