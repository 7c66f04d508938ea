"""mailsys.dsn: delivery status notifications, parsed back with the stdlib ``email``."""
import email
import email.policy
import re
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsys import dsn
from mailsys.dsn import RecipientStatus, dsn_params, make_report, never_bounce, wants

NOW = 1795785000.0
ARRIVAL = 1795784949.79
QID = "198507101A4F8000"
HOST = "mail.example.com"

ORIGINAL = (b"Received: from client.example.net (client.example.net [192.0.2.1])\r\n"
            b"\tby mail.example.com with ESMTP id 198507101A4F8000\r\n"
            b"From: Alice <alice@example.com>\r\n"
            b"To: bob@example.org, carol@example.org\r\n"
            b"Subject: lunch\r\n"
            b"Message-ID: <m1@example.com>\r\n"
            b"\r\n"
            b"Shall we?\r\n"
            b"\r\n"
            b"-- \r\n"
            b"Alice\r\n")
ORIGINAL_HEADERS = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]

TOP_FIELDS = {"From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
              "MIME-Version", "Content-Type", "Content-Transfer-Encoding"}
MESSAGE_FIELDS = {"Original-Envelope-Id", "Reporting-MTA", "Arrival-Date",
                  "X-Mailsys-Queue-ID", "X-Mailsys-Sender"}
RECIPIENT_FIELDS = {"Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
                    "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"}


def envelope(**params):
    return {"id": QID, "arrival": ARRIVAL, "sender": "alice@example.com",
            "params": params,
            "recipients": [{"rcpt": "bob@example.org", "state": "queued",
                            "orcpt": ["rfc822", "Bob@Example.org"]},
                           {"rcpt": "carol@example.org", "state": "queued"}],
            "client": {"ip": "192.0.2.1", "name": "client.example.net"},
            "size": len(ORIGINAL)}


def bob_failed(**kw):
    values = dict(rcpt="bob@example.org", action="failed", status="5.1.1",
                  diagnostic="550 5.1.1 <bob@example.org>: Recipient address rejected: "
                             "User unknown",
                  remote_mta="mx.example.org", orcpt=("rfc822", "Bob@Example.org"),
                  last_attempt=NOW - 1, will_retry_until=None)
    values.update(kw)
    return RecipientStatus(**values)


def carol_expired(**kw):
    values = dict(rcpt="carol@example.org", action="failed", status="4.4.7",
                  diagnostic="421 4.4.2 mx2.example.org: timeout", remote_mta=None, orcpt=None,
                  last_attempt=NOW - 60, will_retry_until=None)
    values.update(kw)
    return RecipientStatus(**values)


def report(statuses=None, kind="failure", env=None, original=ORIGINAL, **kw):
    return make_report(reporting_mta=HOST, queue_id=QID, envelope=env or envelope(),
                       original=original, statuses=statuses or [bob_failed(), carol_expired()],
                       kind=kind, now=NOW, **kw)


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def check_wire(raw):
    """CRLF only, no NUL, no line over 998 octets, ends with CRLF."""
    assert raw.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None, "bare CR or LF"
    assert b"\x00" not in raw
    longest = max(len(line) for line in raw.split(b"\r\n"))
    assert longest <= 998


def boundary_of(raw):
    return parse(raw).get_param("boundary").encode("ascii")


def raw_parts(raw):
    """The three body parts as bytes, each (header section, content)."""
    b = boundary_of(raw)
    body = raw[raw.index(b"\r\n\r\n") + 4:]
    pieces = body.split(b"\r\n--" + b)
    assert pieces[-1] == b"--\r\n"
    out = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, sep, content = piece[2:].partition(b"\r\n\r\n")
        out.append((head, content))
    return out


def blocks(raw):
    part = list(parse(raw).iter_parts())[1]
    return [dict(block.items()) for block in part.get_payload()]


# ---------------------------------------------------------------- structure


def test_failure_report_structure():
    raw = report()
    check_wire(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Date"].endswith("+0000")
    assert re.fullmatch(rf"<{QID}\.dsn-failure\.[0-9a-f]+@{re.escape(HOST)}>", msg["Message-ID"])
    assert set(msg.keys()) <= TOP_FIELDS
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert not msg.defects and not any(p.defects for p in parts)


def test_delivery_status_fields():
    raw = report(env=envelope(envid="QQ314159", ret="FULL"))
    assert blocks(raw) == [
        {"Original-Envelope-Id": "QQ314159",
         "Reporting-MTA": f"dns; {HOST}",
         "Arrival-Date": "Fri, 27 Nov 2026 13:09:09 +0000",
         "X-Mailsys-Queue-ID": QID,
         "X-Mailsys-Sender": "rfc822; alice@example.com"},
        {"Original-Recipient": "rfc822;Bob@Example.org",
         "Final-Recipient": "rfc822; bob@example.org",
         "Action": "failed",
         "Status": "5.1.1",
         "Remote-MTA": "dns; mx.example.org",
         "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: "
                            "User unknown",
         "Last-Attempt-Date": "Fri, 27 Nov 2026 13:09:59 +0000"},
        {"Final-Recipient": "rfc822; carol@example.org",
         "Action": "failed",
         "Status": "4.4.7",
         "Diagnostic-Code": "smtp; 421 4.4.2 mx2.example.org: timeout",
         "Last-Attempt-Date": "Fri, 27 Nov 2026 13:09:00 +0000"},
    ]


def test_per_message_fields_in_rfc3464_order():
    _, content = raw_parts(report(env=envelope(envid="E1")))[1]
    names = [line.split(b":")[0] for line in content.split(b"\r\n\r\n")[0].split(b"\r\n")]
    assert names == [b"Original-Envelope-Id", b"Reporting-MTA", b"Arrival-Date",
                     b"X-Mailsys-Queue-ID", b"X-Mailsys-Sender"]


def test_no_envid_no_orcpt_no_fields():
    raw = report(statuses=[bob_failed(orcpt=None, remote_mta=None, diagnostic=None,
                                      last_attempt=None)])
    b = blocks(raw)
    assert "Original-Envelope-Id" not in b[0]
    assert b[1] == {"Final-Recipient": "rfc822; bob@example.org", "Action": "failed",
                    "Status": "5.1.1"}


def test_text_part_lists_each_recipient_and_diagnostic():
    text = list(parse(report()).iter_parts())[0].get_content()
    flat = " ".join(text.split())
    assert "<bob@example.org>: host mx.example.org said: 550 5.1.1 <bob@example.org>: " \
           "Recipient address rejected: User unknown (status 5.1.1)" in flat
    assert "<carol@example.org>: 421 4.4.2 mx2.example.org: timeout (status 4.4.7)" in flat
    assert QID in flat and HOST in flat
    assert "write to postmaster" in flat
    assert "The original message is attached." in flat


def test_text_part_without_diagnostic_explains_status():
    raw = report(statuses=[carol_expired(diagnostic=None)])
    text = " ".join(list(parse(raw).iter_parts())[0].get_content().split())
    assert "<carol@example.org>: delivery time expired (status 4.4.7)" in text


def test_postmaster_named():
    raw = report(postmaster="postmaster@example.com")
    text = " ".join(list(parse(raw).iter_parts())[0].get_content().split())
    assert "write to postmaster@example.com" in text


def test_to_override_for_postmaster_copy():
    raw = report(env=dict(envelope(), sender=""), to="postmaster@example.com")
    assert parse(raw)["To"] == "postmaster@example.com"


# ---------------------------------------------------------------- RET


def test_ret_hdrs_returns_exactly_the_header_section():
    raw = report(env=envelope(ret="HDRS"))
    check_wire(raw)
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_content() == ORIGINAL_HEADERS.decode()
    head, content = raw_parts(raw)[2]
    assert content == ORIGINAL_HEADERS
    assert b"Shall we?" not in raw


@pytest.mark.parametrize("ret", ["FULL", None])
def test_ret_full_or_unspecified_returns_the_original(ret):
    env = envelope(ret=ret) if ret else envelope()
    raw = report(env=env)
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_content()
    assert inner["Subject"] == "lunch"
    assert inner["Message-ID"] == "<m1@example.com>"
    assert inner.get_content() == "Shall we?\r\n\r\n-- \r\nAlice\r\n"
    head, content = raw_parts(raw)[2]
    assert content == ORIGINAL


def test_original_without_final_crlf_is_returned_byte_for_byte():
    original = ORIGINAL.rstrip(b"\r\n")
    raw = report(original=original)
    check_wire(raw)
    assert raw_parts(raw)[2][1] == original


@pytest.mark.parametrize("kind,action,status", [("delay", "delayed", "4.4.1"),
                                                ("success", "delivered", "2.0.0")])
def test_delay_and_success_return_headers_even_with_ret_full(kind, action, status):
    raw = report(statuses=[bob_failed(action=action, status=status)], kind=kind,
                 env=envelope(ret="FULL"))
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_content() == ORIGINAL_HEADERS.decode()


def test_too_big_original_is_returned_as_headers_and_said_so():
    raw = report(max_original=len(ORIGINAL) - 1)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert parts[2].get_content() == ORIGINAL_HEADERS.decode()
    text = " ".join(parts[0].get_content().split())
    assert f"larger than {len(ORIGINAL) - 1} bytes, so only its header section is attached" \
        in text
    # at the limit it still goes whole
    raw = report(max_original=len(ORIGINAL))
    assert list(parse(raw).iter_parts())[2].get_content_type() == "message/rfc822"


def test_default_limit():
    assert dsn.MAX_ORIGINAL == 1024 * 1024
    big = ORIGINAL_HEADERS + b"\r\n" + (b"x" * 70 + b"\r\n") * (dsn.MAX_ORIGINAL // 72 + 1)
    raw = report(original=big)
    assert list(parse(raw).iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert len(raw) < 64 * 1024


def test_original_with_overlong_line_goes_as_headers():
    original = ORIGINAL_HEADERS + b"\r\n" + b"y" * 5000 + b"\r\n"
    raw = report(original=original)
    check_wire(raw)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert parts[2].get_content() == ORIGINAL_HEADERS.decode()
    assert "lines too long" in " ".join(parts[0].get_content().split())


def test_overlong_header_line_and_nul_are_cut():
    original = b"Subject: " + b"z" * 3000 + b"\r\nX-Nul: a\x00b\r\n\r\nbody\r\n"
    raw = report(original=original)
    check_wire(raw)
    part = list(parse(raw).iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    lines = part.get_content().split("\r\n")
    assert lines[0] == "Subject: " + "z" * (998 - 9)
    assert lines[1] == "X-Nul: ab"


def test_bare_line_ends_in_original_become_crlf():
    raw = report(original=b"Subject: a\nX: b\r\rbody\n")
    check_wire(raw)
    assert raw_parts(raw)[2][1] == b"Subject: a\r\nX: b\r\n\r\nbody\r\n"


@pytest.mark.parametrize("original,headers", [
    (b"\r\nno headers at all\r\n", ""),
    (b"Subject: only headers\r\n", "Subject: only headers\r\n"),
    (b"Subject: no crlf", "Subject: no crlf\r\n"),
    (b"", ""),
])
def test_header_section_edge_cases(original, headers):
    raw = report(original=original, env=envelope(ret="HDRS"))
    check_wire(raw)
    parts = list(parse(raw).iter_parts())
    assert len(parts) == 3
    assert parts[2].get_content() == headers


# ---------------------------------------------------------------- kinds


def test_delay_report():
    until = ARRIVAL + 5 * 86400
    raw = report(kind="delay", statuses=[bob_failed(action="delayed", status="4.4.1",
                                                    diagnostic="connect to mx.example.org: "
                                                               "Connection refused",
                                                    will_retry_until=until)])
    check_wire(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert re.fullmatch(rf"<{QID}\.dsn-delay\.[0-9a-f]+@{re.escape(HOST)}>", msg["Message-ID"])
    rcpt = blocks(raw)[1]
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.4.1"
    assert rcpt["Will-Retry-Until"] == "Wed, 02 Dec 2026 13:09:09 +0000"
    text = " ".join(list(msg.iter_parts())[0].get_content().split())
    assert "not yet been delivered" in text
    assert "by Wed, 02 Dec 2026 13:09:09 +0000" in text


def test_will_retry_until_only_for_delayed():
    raw = report(statuses=[bob_failed(will_retry_until=NOW + 100)])
    assert "Will-Retry-Until" not in blocks(raw)[1]


def test_success_report():
    raw = report(kind="success", statuses=[
        bob_failed(action="delivered", status="2.0.0", diagnostic="250 2.0.0 Ok: queued as X"),
        carol_expired(action="relayed", status="2.0.0", diagnostic=None,
                      remote_mta="mx.old.example"),
    ])
    check_wire(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    b = blocks(raw)
    assert [x["Action"] for x in b[1:]] == ["delivered", "relayed"]
    assert b[1]["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as X"
    text = " ".join(list(msg.iter_parts())[0].get_content().split())
    assert "<bob@example.org>: delivered via mx.example.org" in text
    assert "<carol@example.org>: relayed to mx.old.example" in text


def test_typed_diagnostic_is_kept():
    raw = report(statuses=[bob_failed(diagnostic="X-Mailsys; mailbox store: disk full")])
    assert blocks(raw)[1]["Diagnostic-Code"] == "X-Mailsys; mailbox store: disk full"
    raw = report(statuses=[bob_failed(diagnostic="SMTP;550 no")])
    assert blocks(raw)[1]["Diagnostic-Code"] == "smtp; 550 no"


def test_a_diagnostic_of_our_own_is_not_what_a_host_said():
    """X-Mailsys: mailsys wrote it (a lost connection, say), so the text part
    does not put it in the mouth of the Remote-MTA; smtp: the host's reply."""
    raw = report(statuses=[bob_failed(diagnostic="X-Mailsys; lost connection with "
                                                 "mx.example.org[192.0.2.1]:25 while sending "
                                                 "end of data", status="4.4.2")])
    flat = " ".join(list(parse(raw).iter_parts())[0].get_content().split())
    assert ("<bob@example.org>: lost connection with mx.example.org[192.0.2.1]:25 while sending "
            "end of data (status 4.4.2)") in flat
    assert "said" not in flat
    assert blocks(raw)[1]["Remote-MTA"] == "dns; mx.example.org"


def test_message_ids_differ_between_reports():
    assert parse(report())["Message-ID"] != parse(report())["Message-ID"]


@pytest.mark.parametrize("kwargs", [
    {"kind": "bounce"},
    {"statuses": [bob_failed(action="deleted")]},
    {"statuses": [bob_failed(status="5.1")]},
    {"statuses": [bob_failed(status="3.0.0")]},
])
def test_programming_errors_raise(kwargs):
    with pytest.raises(ValueError):
        report(**kwargs)


def test_empty_statuses_raise():
    with pytest.raises(ValueError):
        make_report(reporting_mta=HOST, queue_id=QID, envelope=envelope(), original=ORIGINAL,
                    statuses=[], kind="failure", now=NOW)


# ---------------------------------------------------------------- sanitising


def test_crlf_in_diagnostic_does_not_inject():
    evil = "550 5.1.1 no\r\nX-Injected: 1\r\n\r\nFinal-Recipient: rfc822; evil@x\nBcc: x@y\rZ: 1"
    raw = report(statuses=[bob_failed(diagnostic=evil)])
    check_wire(raw)
    b = blocks(raw)
    assert len(b) == 2
    assert set(b[1]) <= RECIPIENT_FIELDS
    assert b[1]["Final-Recipient"] == "rfc822; bob@example.org"
    assert b[1]["Diagnostic-Code"] == ("smtp; 550 5.1.1 no X-Injected: 1 Final-Recipient: "
                                       "rfc822; evil@x Bcc: x@y Z: 1")
    assert b"\r\nX-Injected" not in raw and b"\r\nBcc" not in raw


def test_crlf_everywhere_else_does_not_inject():
    env = envelope(envid="E1\r\nX-A: 1")
    env["sender"] = "alice@example.com\r\nX-B: 1"
    raw = make_report(reporting_mta="mail.example.com\r\nX-C: 1", queue_id=QID + "\r\nX-D: 1",
                      envelope=env, original=ORIGINAL, kind="failure", now=NOW,
                      postmaster="pm\r\nX-E: 1",
                      statuses=[bob_failed(rcpt="bob@example.org\r\nX-F: 1",
                                           remote_mta="mx\r\nX-G: 1",
                                           orcpt=("rfc822", "b@x\r\nX-H: 1"))])
    check_wire(raw)
    msg = parse(raw)
    assert set(msg.keys()) <= TOP_FIELDS
    b = blocks(raw)
    assert set(b[0]) <= MESSAGE_FIELDS and set(b[1]) <= RECIPIENT_FIELDS
    for name in "ABCDEFGH":
        assert f"\r\nX-{name}".encode() not in raw


def test_non_ascii_diagnostic_is_replaced():
    diag = "550 Benutzer unbekannt: J\u00f6rg \udce9 \u2028x"
    raw = report(statuses=[bob_failed(diagnostic=diag)])
    check_wire(raw)
    assert blocks(raw)[1]["Diagnostic-Code"] == "smtp; 550 Benutzer unbekannt: J?rg ? x"
    assert raw.isascii()
    assert dsn_params(raw) == {}


def test_long_diagnostic_is_folded_and_bounded():
    words = " ".join(f"word{i}" for i in range(2000))
    raw = report(statuses=[bob_failed(diagnostic="550 " + words + " " + "q" * 3000)])
    check_wire(raw)
    diag = blocks(raw)[1]["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 word0 word1 ")
    assert diag.endswith("...")
    assert len(diag) <= 4000 + len("smtp; ") + 10
    _, content = raw_parts(raw)[1]
    assert max(len(line) for line in content.split(b"\r\n")) <= 78 + 10


def test_unbreakable_diagnostic_fits_998():
    raw = report(statuses=[bob_failed(diagnostic="x" * 3500)])
    check_wire(raw)


def test_utf8_recipient_and_orcpt_are_7bit_xtext():
    env = envelope(smtputf8=True)
    env["sender"] = "alice@example.com"
    raw = report(env=env, statuses=[bob_failed(rcpt="j\u00f6rg@b\u00fccher.example",
                                               orcpt=("utf-8", "j\\x{F6}rg+x@example.org"))])
    check_wire(raw)
    assert raw.isascii()
    b = blocks(raw)
    assert b[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert b[1]["Original-Recipient"] == "utf-8;j\\x{F6}rg\\x{2B}x@example.org"
    text_part = list(parse(raw).iter_parts())[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<j\u00f6rg@b\u00fccher.example>" in text_part.get_content()


def test_rfc822_orcpt_with_utf8_becomes_utf8_type():
    raw = report(statuses=[bob_failed(orcpt=("rfc822", "\u00e5se@example.org"))])
    assert blocks(raw)[1]["Original-Recipient"] == "utf-8;\\x{E5}se@example.org"


def test_bad_orcpt_type_is_left_out():
    raw = report(statuses=[bob_failed(orcpt=("rfc 822", "b@x"))])
    assert "Original-Recipient" not in blocks(raw)[1]


def test_utf8_sender_needs_smtputf8():
    env = envelope(smtputf8=True)
    env["sender"] = "\u00e5se@example.org"
    raw = report(env=env)
    check_wire(raw)
    assert parse(raw)["To"] == "\u00e5se@example.org"
    assert blocks(raw)[0]["X-Mailsys-Sender"] == "utf-8; \\x{E5}se@example.org"
    assert dsn_params(raw) == {"body": "8BITMIME", "smtputf8": True}


def test_very_long_utf8_sender_still_fits_998():
    env = envelope(smtputf8=True)
    env["sender"] = "\U0001F600" * 600 + "@example.org"
    raw = report(env=env, postmaster="\U0001F600" * 600,
                 statuses=[bob_failed(rcpt="\U0001F600" * 600 + "@example.org")])
    check_wire(raw)
    assert len(list(parse(raw).iter_parts())) == 3
    b = blocks(raw)
    assert b[0]["X-Mailsys-Sender"] == "utf-8; " + "\\x{1F600}" * 100
    assert b[1]["Final-Recipient"] == "utf-8; " + "\\x{1F600}" * 100


def test_long_orcpt_is_cut_not_split():
    raw = report(statuses=[bob_failed(orcpt=("utf-8", "\\x{E5}" * 400))])
    check_wire(raw)
    assert blocks(raw)[1]["Original-Recipient"] == "utf-8;" + "\\x{E5}" * 150


def test_utf8_original_is_message_global():
    original = "Subject: gr\u00fc\u00dfe\r\nFrom: \u00e5se@example.org\r\n\r\nhej\r\n".encode()
    raw = report(env=envelope(smtputf8=True), original=original)
    check_wire(raw)
    msg = parse(raw)
    parts = list(msg.iter_parts())
    assert parts[2].get_content_type() == "message/global"
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert raw_parts(raw)[2][1] == original
    assert dsn_params(raw) == {"body": "8BITMIME"}
    raw = report(env=envelope(smtputf8=True, ret="HDRS"), original=original)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "message/global-headers"
    assert raw_parts(raw)[2][1] == original[:original.index(b"\r\n\r\n") + 2]


def test_8bit_body_is_message_rfc822_8bit():
    original = ORIGINAL_HEADERS + b"\r\nLatin-1: \xe9t\xe9\r\n"
    raw = report(env=envelope(body="8BITMIME"), original=original)
    check_wire(raw)
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"
    assert raw_parts(raw)[2][1] == original
    assert dsn_params(raw) == {"body": "8BITMIME"}


def test_boundary_not_in_original():
    raw = report()
    assert boundary_of(raw) not in ORIGINAL
    assert raw.count(b"--" + boundary_of(raw)) == 4


def test_boundary_collision_picks_another(monkeypatch):
    tokens = iter(["aaaa", "aaaa", "bbbb", "cccc"])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda n=None: next(tokens))
    original = ORIGINAL + f"\r\n--=_{QID}.aaaa\r\n".encode()
    raw = report(original=original)
    b = boundary_of(raw)
    assert b == f"=_{QID}.bbbb".encode()
    assert b not in original
    assert raw_parts(raw)[2][1] == original
    assert len(list(parse(raw).iter_parts())) == 3


# ---------------------------------------------------------------- policy helpers


@pytest.mark.parametrize("notify,failure,delay,success", [
    (None, True, True, False),
    (["NEVER"], False, False, False),
    (["SUCCESS"], False, False, True),
    (["FAILURE"], True, False, False),
    (["DELAY"], False, True, False),
    (["SUCCESS", "FAILURE"], True, False, True),
    (["FAILURE", "DELAY"], True, True, False),
    (["SUCCESS", "FAILURE", "DELAY"], True, True, True),
    (["success", "delay"], False, True, True),
])
def test_wants_truth_table(notify, failure, delay, success):
    rcpt = {"rcpt": "bob@example.org", "state": "queued"}
    if notify is not None:
        rcpt["notify"] = notify
    assert wants(rcpt, "failure") is failure
    assert wants(rcpt, "delay") is delay
    assert wants(rcpt, "success") is success


def test_wants_rejects_unknown_kind():
    with pytest.raises(ValueError):
        wants({"rcpt": "b@x"}, "bounce")


@pytest.mark.parametrize("sender,expected", [
    ("", True), ("<>", True), (None, True), ("alice@example.com", False),
    ("MAILER-DAEMON@example.com", False),
])
def test_never_bounce(sender, expected):
    env = envelope()
    env["sender"] = sender
    assert never_bounce(env) is expected


def test_never_bounce_without_sender_key():
    assert never_bounce({"recipients": []}) is True


def test_dsn_params():
    assert dsn_params(report()) == {}


# ---------------------------------------------------------------- property


def _crlf(data):
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                          exclude_categories=()), max_size=300)
originals = st.one_of(
    st.binary(max_size=3000).map(_crlf),
    st.binary(max_size=300),
    st.lists(st.one_of(st.binary(max_size=1200), st.just(b""), st.just(b"--=_"),
                       st.just(b"Subject: x"), st.just(b"\x00")), max_size=20)
    .map(lambda lines: b"\r\n".join(lines)),
)
statuses = st.builds(
    RecipientStatus,
    rcpt=any_text,
    action=st.sampled_from(dsn.ACTIONS),
    status=st.sampled_from(["5.1.1", "4.4.7", "2.0.0", "5.7.1", "4.2.2"]),
    diagnostic=st.one_of(st.none(), any_text, any_text.map(lambda t: "x" * 1200 + t)),
    remote_mta=st.one_of(st.none(), any_text),
    orcpt=st.one_of(st.none(), st.tuples(st.sampled_from(["rfc822", "utf-8", "x400", "a b"]),
                                         any_text)),
    last_attempt=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    will_retry_until=st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(original=originals, statuses=st.lists(statuses, min_size=1, max_size=4),
       kind=st.sampled_from(dsn.KINDS), sender=any_text, envid=st.one_of(st.none(), any_text),
       ret=st.sampled_from([None, "FULL", "HDRS"]), smtputf8=st.booleans(),
       max_original=st.sampled_from([0, 100, dsn.MAX_ORIGINAL]))
def test_property_always_well_formed(original, statuses, kind, sender, envid, ret, smtputf8,
                                     max_original):
    params = {k: v for k, v in {"envid": envid, "ret": ret, "smtputf8": smtputf8}.items() if v}
    env = {"id": QID, "arrival": ARRIVAL, "sender": sender, "params": params,
           "recipients": [], "size": len(original)}
    raw = make_report(reporting_mta=HOST, queue_id=QID, envelope=env, original=original,
                      statuses=statuses, kind=kind, now=NOW, max_original=max_original)
    check_wire(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert set(msg.keys()) <= TOP_FIELDS
    parts = list(msg.iter_parts())
    assert len(parts) == 3
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    assert parts[2].get_content_type() in ("message/rfc822", "text/rfc822-headers",
                                           "message/global", "message/global-headers")
    b = blocks(raw)
    assert len(b) == 1 + len(statuses)
    assert set(b[0]) <= MESSAGE_FIELDS
    for block, status in zip(b[1:], statuses):
        assert set(block) <= RECIPIENT_FIELDS
        assert block["Action"] == status.action
        assert block["Status"] == status.status
    assert boundary_of(raw) not in original
    assert raw_parts(raw)[0][1].isascii() and raw_parts(raw)[1][1].isascii()
    parts[0].get_content()   # the text part decodes
