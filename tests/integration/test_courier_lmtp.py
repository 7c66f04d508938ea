"""The LMTP courier against a real ``twistd -n mailsys`` with the LMTP role.

The courier runs in its own Python process on the real reactor (``task.react``):
the script below reads a JSON job (endpoint, deliveries, message files), runs the
deliveries through one :class:`LMTPCourier` concurrently and prints the outcomes
as JSON.  Accounts are made by the real CLI (``MDA_ACCOUNTS`` in harness.py).
"""
import email
import json
import subprocess
import sys
import time

import pytest

from tests.integration.harness import (child_env, maildir_files, maildir_of, mbox_of, start_mda,
                                       stored_form)

pytestmark = pytest.mark.integration

RUNNER = r"""
import json, sys
from twisted.internet import defer, task
from mailsys.couriers.lmtp import LMTPCourier

def main(reactor, job_path):
    job = json.load(open(job_path))
    courier = LMTPCourier(reactor, job["endpoint"], "queue.mailsys.test",
                          timeout=job.get("timeout", 60), max_sessions=job.get("max_sessions", 10))
    calls = []
    for d in job["deliveries"]:
        with open(d["message"], "rb") as f:
            message = f.read()
        calls.append(courier.deliver(d["sender"], [(r, {}) for r in d["rcpts"]], message,
                                     d.get("params", {})))
    started = {"active": courier.active, "waiting": courier.waiting}

    @defer.inlineCallbacks
    def run():
        results = yield defer.DeferredList(calls)
        yield courier.idle()      # every session's QUIT answered, every connection closed
        out = [[[type(o).__name__, o.reply.code, o.reply.status, o.reply.text] for o in outcomes]
               for ok, outcomes in results]
        print(json.dumps({"outcomes": out, "active": courier.active, "waiting": courier.waiting,
                          "started": started}))

    return run()

task.react(main, sys.argv[1:])
"""


def run_courier(tmp_path, endpoint, deliveries, started=None, **options):
    """Run the courier in a subprocess; ``deliveries`` are dicts with sender, rcpts and
    message (bytes).  Returns the outcomes per delivery as [name, code, status, text];
    ``started`` (a dict) gets the sessions active and waiting right after the calls."""
    jobs = []
    for n, d in enumerate(deliveries):
        path = tmp_path / f"message{n}.eml"
        path.write_bytes(d["message"])
        jobs.append({"sender": d["sender"], "rcpts": d["rcpts"], "message": str(path),
                     "params": d.get("params", {})})
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps({"endpoint": endpoint, "deliveries": jobs, **options}))
    p = subprocess.run([sys.executable, "-c", RUNNER, str(job_path)], capture_output=True,
                       text=True, timeout=180, env=child_env(), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["active"] == 0 and result["waiting"] == 0
    if started is not None:
        started.update(result["started"])
    return result["outcomes"]


def message(marker, body=b"hello\r\n"):
    return (f"From: <alice@example.org>\r\nTo: <joe@example.com>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.org>\r\n\r\n").encode() + body


def only_file(maildir):
    files = maildir_files(maildir)
    assert len(files) == 1, sorted(files)
    return next(iter(files.values()))


def test_delivered_and_unknown_user(make_server, tmp_path):
    server = start_mda(make_server)
    msg = message("courier-basic", b"first line\r\n.dot line\r\n..two dots\r\n.\r\nlast\r\n")
    (outcomes,) = run_courier(tmp_path, f"unix:{server.lmtp_socket}", [
        {"sender": "alice@example.org", "params": {"body": "8BITMIME"},
         "rcpts": ["joe@example.com", "nobody@example.com", "box@example.com", "ann@example.com"],
         "message": msg}])
    assert [o[:3] for o in outcomes] == [["Delivered", 250, "2.0.0"], ["PermFail", 550, "5.1.1"],
                                         ["Delivered", 250, "2.0.0"], ["Delivered", 250, "2.0.0"]]
    assert "nobody@example.com" in outcomes[1][3]
    for account in ("joe@example.com", "ann@example.com"):
        data = only_file(maildir_of(server, account))
        assert data == stored_form("alice@example.org", account, msg)
        parsed = email.message_from_bytes(data)
        assert parsed["Return-Path"] == "<alice@example.org>"
        assert parsed["Delivered-To"] == account
        assert parsed["Subject"] == "courier-basic"
    mbox = mbox_of(server, "box@example.com").read_bytes()
    assert stored_form("alice@example.org", "box@example.com", msg) in mbox
    assert not (server.mail_root / "example.com" / "nobody").exists()
    # The server logged one delivery per accepted recipient and the refusal.
    log = server.log_text()
    assert log.count("relay=local") >= 3 and "reject: RCPT" in log


def test_null_sender_and_utf8(make_server, tmp_path):
    server = start_mda(make_server)
    msg = message("courier-utf8", "Grüße\r\n".encode())
    (outcomes,) = run_courier(tmp_path, f"unix:{server.lmtp_socket}", [
        {"sender": "", "rcpts": ["joe@example.com"], "message": msg,
         "params": {"body": "8BITMIME", "smtputf8": True}}])
    assert outcomes[0][0] == "Delivered"
    assert only_file(maildir_of(server, "joe@example.com")) == stored_form("", "joe@example.com", msg)


def test_three_megabytes_with_dot_lines_arrive_intact(make_server, tmp_path):
    server = start_mda(make_server)
    lines = []
    n = total = 0
    while total < 3 * 1024 * 1024:
        lines.append([b".", b"..", b".leading dot %d" % n, b"plain line %d with some text" % n,
                      b"...three", b". space"][n % 6] + b"\r\n")
        total += len(lines[-1])
        n += 1
    body = b"".join(lines)
    msg = message("courier-big", body)
    assert len(msg) > 3 * 1024 * 1024
    (outcomes,) = run_courier(tmp_path, f"unix:{server.lmtp_socket}", [
        {"sender": "alice@example.org", "rcpts": ["joe@example.com"], "message": msg}])
    assert outcomes[0][:2] == ["Delivered", 250], outcomes
    data = only_file(maildir_of(server, "joe@example.com"))
    assert data == stored_form("alice@example.org", "joe@example.com", msg)


def test_over_quota_is_permanent_for_that_recipient_only(make_server, tmp_path):
    server = start_mda(make_server)
    msg = message("courier-quota", b"x" * 3000 + b"\r\n")
    (outcomes,) = run_courier(tmp_path, f"unix:{server.lmtp_socket}", [
        {"sender": "alice@example.org", "rcpts": ["tiny@example.com", "joe@example.com"],
         "message": msg}])
    assert outcomes[0][:3] == ["PermFail", 552, "5.2.2"]
    assert outcomes[1][0] == "Delivered"
    assert maildir_files(maildir_of(server, "tiny@example.com")) == {}


def test_duplicates_are_delivered_once(make_server, tmp_path):
    server = start_mda(make_server)
    msg = message("courier-dup")
    (outcomes,) = run_courier(tmp_path, f"unix:{server.lmtp_socket}", [
        {"sender": "alice@example.org", "rcpts": ["joe@example.com", "joe@EXAMPLE.COM",
                                                  '"joe"@example.com', "joe@example.com"],
         "message": msg}])
    assert [o[0] for o in outcomes] == ["Delivered"] * 4
    # One mailbox (RFC 5321: domain case-insensitive, needless quotes dropped): one copy.
    assert len(maildir_files(maildir_of(server, "joe@example.com"))) == 1


def test_many_concurrent_deliveries_over_tcp_with_few_sessions(make_server, tmp_path):
    server = start_mda(make_server, unix=False, tcp=True)
    deliveries = [{"sender": "alice@example.org", "rcpts": ["joe@example.com", "ann@example.com"],
                   "message": message(f"courier-many-{i}", b".%d\r\n" % i)} for i in range(20)]
    started = {}
    results = run_courier(tmp_path, f"tcp:{server.lmtp_port}:interface=127.0.0.1", deliveries,
                          started=started, max_sessions=3)
    # Three connections at once, the other deliveries waiting their turn.
    assert started == {"active": 3, "waiting": 17}
    assert all(o[0] == "Delivered" for outcomes in results for o in outcomes), results
    for account in ("joe@example.com", "ann@example.com"):
        files = maildir_files(maildir_of(server, account))
        assert sorted(files.values()) == sorted(stored_form("alice@example.org", account, d["message"])
                                                for d in deliveries)


def test_nobody_listening_is_a_temporary_failure(tmp_path):
    started = time.monotonic()
    (outcomes,) = run_courier(tmp_path, f"unix:{tmp_path}/no-such.sock", [
        {"sender": "alice@example.org", "rcpts": ["joe@example.com", "ann@example.com"],
         "message": message("courier-down")}])
    assert time.monotonic() - started < 60
    for o in outcomes:
        assert o[:3] == ["TempFail", 451, "4.4.1"]
        assert o[3].startswith(f"LMTP connection failed: unix:{tmp_path}/no-such.sock: ")


def test_server_stopped_mid_way_is_never_delivered(make_server, tmp_path):
    """A server that goes away: every outcome is a TempFail or a real delivery."""
    server = start_mda(make_server)
    endpoint = f"unix:{server.lmtp_socket}"
    server.stop()
    (outcomes,) = run_courier(tmp_path, endpoint, [
        {"sender": "alice@example.org", "rcpts": ["joe@example.com"], "message": message("x")}])
    assert outcomes[0][:3] == ["TempFail", 451, "4.4.1"]
