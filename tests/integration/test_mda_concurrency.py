"""Twenty LMTP sessions at once into one Maildir and one mbox (issue 4).

Twenty client threads, each with its own LMTP session (a new one every 50
transactions), deliver 5,000 messages to joe@example.com (Maildir) and 5,000 to
box@example.com (mbox), interleaved, so that every delivery races others into the
same mailbox.  Every message carries a unique marker in its Subject, Message-ID
and body, and its body is derived from the marker (sizes 200 bytes to 12 KB,
``From `` lines included), so each stored copy can be checked byte for byte.

Afterwards the Maildir must hold exactly 5,000 files, one per marker, each exactly
the message plus our delivery headers; the mbox must parse (Python's
``mailbox.mbox``) to exactly 5,000 messages, one per marker, each intact after
mboxrd unquoting.  Every transaction must have been answered 250.
"""
import collections
import mailbox
import os
import re
import threading
import time

import pytest

from tests.integration.harness import (LMTPClient, maildir_files, maildir_of, mbox_of,
                                       mboxrd_unquote, start_mda, stored_form)

pytestmark = pytest.mark.integration

SESSIONS = 20
PER_MAILBOX = 5000
PER_SESSION = 2 * PER_MAILBOX // SESSIONS       # 500 transactions per thread
RECONNECT_EVERY = 50
TARGETS = ("joe@example.com", "box@example.com")
SENDER = "load@example.org"
SUBJECT = re.compile(rb"(?m)^Subject: (conc-\d+-\d+)$")


def build(marker, n):
    sizes = (200, 900, 3000, 12000)
    line = f"{marker} payload line; From here to there 0123456789".encode()
    body = [line] * (sizes[n % len(sizes)] // (len(line) + 2) + 1)
    body[len(body) // 2] = f"From {marker} in the middle of the body".encode()
    if n % 3 == 0:
        body.insert(0, b">From the first line, already quoted once")
    return (f"From: <{SENDER}>\r\nTo: <rcpt@example.com>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@example.org>\r\n\r\n").encode() + b"\r\n".join(body) + b"\r\n"


def session(path, index, results):
    client = None
    try:
        for n in range(PER_SESSION):
            if client is None:
                client = LMTPClient(path, timeout=120)
            marker = f"conc-{index}-{n}"
            rcpt = TARGETS[n % 2]
            _, rcpts, after = client.transaction(SENDER, [rcpt], build(marker, n))
            results.append((marker, rcpt, rcpts, after))
            if (n + 1) % RECONNECT_EVERY == 0:
                client.quit()
                client = None
    except Exception as e:  # noqa: BLE001 - reported by the test
        results.append((f"session-{index}", None, None, [f"client error: {e!r}"]))
    finally:
        if client is not None:
            client.quit()


def test_twenty_sessions_into_one_maildir_and_one_mbox(make_server):
    server = start_mda(make_server)
    results = []
    threads = [threading.Thread(target=session, args=(server.lmtp_socket, i, results), daemon=True)
               for i in range(SESSIONS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
        assert not t.is_alive(), "an LMTP session hangs"
    elapsed = time.monotonic() - t0
    print(f"{2 * PER_MAILBOX} deliveries over {SESSIONS} sessions in {elapsed:.1f} s "
          f"({2 * PER_MAILBOX / elapsed:.0f}/s)")

    bad = [(m, r, rc, a) for m, r, rc, a in results
           if rc != ["250 2.1.5 Ok"] or len(a) != 1 or not a[0].startswith("250 2.0.0 ")]
    assert bad == [], f"{len(bad)} transactions not delivered, first: {bad[:5]}"
    assert len(results) == 2 * PER_MAILBOX
    expected = {rcpt: {m for m, r, _, _ in results if r == rcpt} for rcpt in TARGETS}
    assert all(len(v) == PER_MAILBOX for v in expected.values())
    n_of = {m: int(m.rsplit("-", 1)[1]) for m, _, _, _ in results}

    maildir = maildir_of(server, "joe@example.com")
    files = maildir_files(maildir)
    assert len(files) == PER_MAILBOX, f"{len(files)} files in new/"
    assert os.listdir(maildir / "tmp") == []
    seen = collections.Counter()
    for name, data in files.items():
        m = SUBJECT.search(data)
        assert m, f"{name}: no marker"
        marker = m.group(1).decode()
        seen[marker] += 1
        assert data == stored_form(SENDER, "joe@example.com", build(marker, n_of[marker])), name
    assert set(seen) == expected["joe@example.com"]
    assert max(seen.values()) == 1

    mb = mailbox.mbox(mbox_of(server, "box@example.com"), create=False)
    keys = mb.keys()
    assert len(keys) == PER_MAILBOX, f"the mbox parses to {len(keys)} messages"
    seen = collections.Counter()
    for key in keys:
        data = mboxrd_unquote(mb.get_bytes(key))
        m = SUBJECT.search(data)
        assert m, f"mbox message {key}: no marker: {data[:200]!r}"
        marker = m.group(1).decode()
        seen[marker] += 1
        assert data == stored_form(SENDER, "box@example.com", build(marker, n_of[marker])), key
        assert mb.get_message(key).get_from().startswith(SENDER + " ")
    assert set(seen) == expected["box@example.com"]
    assert max(seen.values()) == 1
    assert not os.path.exists(str(mbox_of(server, "box@example.com")) + ".lock")
    # twistd rotates its log every megabyte: read FILE.N ... FILE.1 and FILE.
    logs = sorted(server.log_path.parent.glob(server.log_path.name + ".*"),
                  key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    log = "".join(p.read_text(errors="replace") for p in logs) + server.log_text()
    assert "Traceback" not in log
    assert len(re.findall(r"(?m)relay=local, .*status=sent \(", log)) == 2 * PER_MAILBOX
