"""kill -9 during load: the spool keeps every acknowledged message, exactly once.

Twenty client threads send messages as fast as they can, a new connection for
each, while the server is killed with SIGKILL; the server is then restarted on
the same state directory.  Each message carries a unique marker (Subject and
Message-ID), and the client records how far its transaction got:

``accepted``  the end of DATA was answered 250 (the reply names the queue id):
              the message MUST be in the spool exactly once, under that id,
              byte for byte.
``inflight``  the whole message and its end-of-data dot were handed to the
              kernel, but no reply came back before the server died.  The server
              may have made it durable just before dying, or not: this is the
              RFC 1047 window in which a sender cannot know, and retries (a
              possible duplicate) rather than risk a loss.  Such a message MAY be
              in the spool, but at most once.
``unsent``    the connection broke while the message was being sent, so the
              server never saw its end: it MUST NOT be in the spool.
``rejected``  the end of DATA got a reply other than 250: MUST NOT be in the spool.
``early``     the session ended before DATA was accepted: MUST NOT be in the spool.

The cycle runs three times on the same spool, and all earlier rounds are checked
again after every restart; a restarted server must log no traceback.
"""
import collections
import os
import random
import re
import signal
import smtplib
import threading
import time

import pytest

from tests.integration.harness import split_received

pytestmark = pytest.mark.integration

THREADS = 20
# Two more clients per round send a whole body (one larger than what the spool keeps
# in memory, so it sits in a scratch file) and then stall before the final dot.
STALLED_SIZES = (100_000, 6 * 1024 * 1024)
ROUNDS = 3
JOIN_TIMEOUT = 60
MARKER = re.compile(rb"^Subject: (crash-r\d+-t\d+-\d+)\r$", re.M)
QUEUED = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)\Z")


class Attempt:
    __slots__ = ("marker", "message", "state", "qid", "reply")

    def __init__(self, marker, message):
        self.marker, self.message = marker, message
        self.state, self.qid, self.reply = "early", None, None


def build_message(marker, rng):
    # 200 bytes to 64 KiB: small ones finish quickly, large ones are often cut
    # off mid-DATA by the kill.
    size = rng.choice((200, 2000, 8000, 30000, 65536))
    line = f"{marker} ".encode() + b"0123456789abcdefghijklmnopqrstuvwxyz" * 2
    body = (line + b"\r\n") * max(1, size // (len(line) + 2))
    return (f"From: <load@example.org>\r\nTo: <joe@example.com>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@crash.example.org>\r\n\r\n").encode() + body


def client_loop(port, round_no, thread_no, stop, attempts):
    rng = random.Random(f"{round_no}-{thread_no}")
    seq = 0
    while not stop.is_set():
        seq += 1
        marker = f"crash-r{round_no}-t{thread_no}-{seq}"
        attempt = Attempt(marker, build_message(marker, rng))
        attempts.append(attempt)
        client = None
        try:
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="crash.example.org", timeout=20)
            client.ehlo("crash.example.org")
            if client.mail("load@example.org")[0] != 250 or client.rcpt("joe@example.com")[0] != 250:
                continue
            if client.docmd("DATA")[0] != 354:
                continue
            attempt.state = "unsent"
            client.send(re.sub(rb"(?m)^\.", b"..", attempt.message))
            if seq % 3 == 0:
                # Widen the window in which the server holds a whole body but no
                # end-of-data: a kill there must leave nothing behind.
                time.sleep(0.005)
            client.send(b".\r\n")
            attempt.state = "inflight"
            code, text = client.getreply()
            attempt.reply = (code, text)
            if code == 250 and QUEUED.match(text):
                attempt.state, attempt.qid = "accepted", QUEUED.match(text).group(1).decode()
            else:
                attempt.state = "rejected"
            client.quit()
        except (smtplib.SMTPException, OSError):
            if attempt.state == "early":
                time.sleep(0.01)   # the server is down: do not spin
        finally:
            if client is not None:
                client.close()


def stalled_client(port, attempt, sent, stop):
    """Sends a whole body but never the end-of-data dot; waits for the kill."""
    client = None
    try:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="crash.example.org", timeout=20)
        client.ehlo("crash.example.org")
        client.mail("load@example.org")
        client.rcpt("joe@example.com")
        if client.docmd("DATA")[0] == 354:
            attempt.state = "unsent"
            client.send(re.sub(rb"(?m)^\.", b"..", attempt.message))
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        sent.set()
        stop.wait(JOIN_TIMEOUT)
        if client is not None:
            client.close()


def run_round(server, round_no, kill_after):
    stop = threading.Event()
    per_thread = [[] for _ in range(THREADS + len(STALLED_SIZES))]
    threads = [threading.Thread(target=client_loop, name=f"crash-{round_no}-{t}", daemon=True,
                                args=(server.port, round_no, t, stop, per_thread[t]))
               for t in range(THREADS)]
    sent = []
    for i, size in enumerate(STALLED_SIZES):
        marker = f"crash-r{round_no}-t{THREADS + i}-1"
        head = (f"From: <load@example.org>\r\nTo: <joe@example.com>\r\nSubject: {marker}\r\n"
                f"Message-ID: <{marker}@crash.example.org>\r\n\r\n").encode()
        attempt = Attempt(marker, head + (b"z" * 998 + b"\r\n") * (size // 1000))
        per_thread[THREADS + i].append(attempt)
        sent.append(threading.Event())
        threads.append(threading.Thread(target=stalled_client, name=f"stalled-{round_no}-{i}",
                                        daemon=True, args=(server.port, attempt, sent[-1], stop)))
    for t in threads:
        t.start()
    for event in sent:
        assert event.wait(JOIN_TIMEOUT), "a stalled client could not send its body"
    time.sleep(kill_after)
    incoming = os.path.join(server.state_dir, "spool", "incoming")
    scratch = len(os.listdir(incoming)) if os.path.isdir(incoming) else 0
    server.kill9()
    stop.set()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), f"client thread {t.name} hung after the kill"
    return [a for attempts in per_thread for a in attempts], scratch


def check_spool(server, attempts):
    entries = server.spool()
    by_marker = collections.defaultdict(list)
    for entry in entries:
        stored = entry.read_message()
        m = MARKER.search(stored)
        assert m, f"{entry.queue_id}: a message nobody sent is in the spool:\n{stored[:300]!r}"
        by_marker[m.group(1).decode()].append((entry, stored))
    qids = [e.queue_id for e in entries]
    assert len(set(qids)) == len(qids), "a queue id occurs twice in the spool"
    known = {a.marker: a for a in attempts}
    assert set(by_marker) <= set(known)

    for a in attempts:
        found = by_marker.get(a.marker, [])
        if a.state == "accepted":
            assert len(found) == 1, f"{a.marker} got 250 ({a.qid}) but is in the spool {len(found)} times"
            entry, stored = found[0]
            assert entry.queue_id == a.qid, (a.marker, a.qid, entry.queue_id)
            assert split_received(stored)[1] == a.message, f"{a.marker} ({a.qid}) changed in the spool"
            assert entry.envelope["sender"] == "load@example.org"
            assert entry.envelope["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"}]
        elif a.state == "inflight":
            assert len(found) <= 1, f"{a.marker} (no reply) is in the spool {len(found)} times"
            if found:
                assert split_received(found[0][1])[1] == a.message
        else:
            assert not found, (f"{a.marker} ({a.state}, reply {a.reply}) is in the spool as "
                               f"{[e.queue_id for e, _ in found]}")
    return entries


def test_kill9_during_load_loses_no_acknowledged_message(server):
    all_attempts = []
    summary = []
    for round_no in range(1, ROUNDS + 1):
        attempts, scratch = run_round(server, round_no, kill_after=1.0 + 0.4 * round_no)
        all_attempts += attempts
        counts = collections.Counter(a.state for a in attempts)
        stalled = [a for a in attempts if a.marker.endswith("-1") and
                   int(a.marker.split("-t")[1].split("-")[0]) >= THREADS]
        assert [a.state for a in stalled] == ["unsent"] * len(STALLED_SIZES), \
            [(a.marker, a.state) for a in stalled]
        assert counts["accepted"] > 0, f"round {round_no}: nothing was accepted before the kill: {counts}"

        server.start()
        after = server.log_since_start()
        assert "Traceback" not in after and "Unhandled" not in after, after
        entries = check_spool(server, all_attempts)
        # Scratch files of bodies that never got their end-of-data are gone.
        incoming = os.path.join(server.state_dir, "spool", "incoming")
        assert not os.path.isdir(incoming) or os.listdir(incoming) == []
        # The restarted server counts the same complete messages as the reader does.
        m = re.search(r"spool: (\d+) queued messages in \d+ segments", after)
        assert m, after
        assert int(m.group(1)) == len(entries)
        in_flight_kept = sum(1 for a in attempts if a.state == "inflight"
                             and any(a.marker.encode() in e.read_message() for e in entries))
        summary.append(f"round {round_no}: {dict(counts)}, in flight kept {in_flight_kept}, "
                       f"scratch files at the kill {scratch}, spool {len(entries)}")

    # After three crashes the server still takes mail and stops cleanly.
    client = server.smtp()
    try:
        client.mail("load@example.org")
        client.rcpt("joe@example.com")
        code, text = client.data(b"Subject: after the crashes\r\n\r\nstill here\r\n")
        assert code == 250 and QUEUED.match(text), (code, text)
    finally:
        client.quit()
    # twistd ends a SIGTERM-ed run by re-raising SIGTERM on itself, after a clean shutdown.
    assert server.stop() == -signal.SIGTERM
    after = server.log_since_start()
    assert after.rstrip().endswith("Server Shut Down."), after[-2000:]
    log = server.log_text()
    assert "Traceback" not in log, log[-5000:]
    print("\n".join(summary))
