"""kill -9 of a real ``twistd -n mailsys`` while POP3's QUIT applies deletions.

QUIT is the one moment POP3 changes a mailbox (RFC 1939 section 6, the UPDATE
state), so it is a crash path: a kill there must never lose a message the user
kept, nor leave a mailbox the next login cannot read.  For mbox the change is a
rewrite: a copy without the deleted messages, fsynced, renamed over the mbox
(mailsys.pop3.mailbox.MboxBox.commit), so a kill leaves either the old mbox or
the new one, whole, plus (before the rename) the copy, which the next login
removes.  For Maildir each deleted file is unlinked on its own, so a kill leaves
some of the deleted messages and every kept one.

Each attempt kills the whole host (twistd, and with it the worker serving the
session) once the change has visibly started, then checks the store on disk
before the restart and through POP3 after it.  An attempt whose kill comes
after the change finished is repeated.
"""
import mailbox
import os
import time

import pytest

from tests.integration.harness import (lmtp_deliver, maildir_files, maildir_of, mbox_of,
                                       mboxrd_unquote, pop3_client, start_pop3, stored_form)

pytestmark = pytest.mark.integration

SENDER = "sender@example.org"
JOE, BOX = "joe@example.com", "box@example.com"   # Maildir and mbox accounts of the harness
ATTEMPTS = 8


def big_message(tag, size):
    head = (f"From: <{SENDER}>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@example.org>\r\n\r\n"
            ).encode()
    line = f"{tag} 0123456789 a line that a kill may cut in two\r\n".encode()
    return head + line * (size // len(line))


def deliver(server, account, messages):
    for m in messages:
        _, rcpt, after = lmtp_deliver(server.lmtp_socket, SENDER, [account], m)
        assert rcpt == ["250 2.1.5 Ok"] and after[0].startswith("250 2.0.0"), (rcpt, after)


def workers_of(server):
    """The worker processes of the running host (children of twistd)."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def kill_host(server):
    """kill -9 of twistd; the workers follow (PR_SET_PDEATHSIG): wait until they
    are gone too, so that what is on disk afterwards is what the crash left."""
    workers = workers_of(server)
    server.kill9()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived twistd's kill -9"
        time.sleep(0.01)


def quit_without_waiting(server, account, numbers):
    """Log in, mark ``numbers`` deleted, send QUIT and return at once."""
    client = pop3_client(server, login=account)
    for n in numbers:
        client.dele(n)
    client.sock.sendall(b"QUIT\r\n")
    return client


def mbox_messages(path):
    box = mailbox.mbox(path, create=False)
    try:
        return [mboxrd_unquote(box.get_bytes(k)) for k in box.keys()]
    finally:
        box.close()


def test_kill9_during_an_mbox_rewrite_keeps_every_kept_message(make_server):
    server = start_pop3(make_server)
    path = mbox_of(server, BOX)
    home = path.parent
    sent = [big_message(f"m{i}", 1 << 20) for i in range(12)]
    deliver(server, BOX, sent)
    expected = [stored_form(SENDER, BOX, m) for m in sent]
    assert mbox_messages(path) == expected
    for attempt in range(ATTEMPTS):
        doomed = list(range(1, len(expected) + 1, 2))
        kept = [m for i, m in enumerate(expected, 1) if i not in doomed]
        ino = path.stat().st_ino
        client = quit_without_waiting(server, BOX, doomed)
        deadline = time.monotonic() + 30
        while True:     # the copy has bytes in it, or the rename is done
            copies = list(home.glob(".mbox.pop3.*.tmp"))
            if copies and copies[0].exists() and copies[0].stat().st_size > 0:
                break
            if path.stat().st_ino != ino:
                break
            assert time.monotonic() < deadline, "QUIT never started the rewrite"
        kill_host(server)
        client.close()
        replaced = path.stat().st_ino != ino
        left = list(home.glob(".mbox.pop3.*.tmp"))
        # Either the old mbox or the new one, whole: never a mix, never less.
        assert mbox_messages(path) == (kept if replaced else expected)
        server.start()
        if replaced:
            print(f"attempt {attempt}: the kill came after the rename; again")
            assert not left
            expected = kept
            more = [big_message(f"m{attempt}-{i}", 1 << 20) for i in range(6)]
            deliver(server, BOX, more)
            expected += [stored_form(SENDER, BOX, m) for m in more]
            continue
        print(f"attempt {attempt}: the kill left a copy of "
              f"{left[0].stat().st_size if left else 0} bytes, before its rename")
        client = pop3_client(server, login=BOX)
        try:
            assert client.stat()[0] == len(expected)
            _, lines, _ = client.retr(len(expected))
            assert b"".join(line + b"\r\n" for line in lines) == expected[-1].replace(
                b"\n", b"\r\n")
            client.quit()
        finally:
            client.close()
        if left:
            assert not list(home.glob(".mbox.pop3.*.tmp"))
            server.wait_for_log(rf"mbox {path}: removed {left[0].name}, left by a rewrite that "
                                r"a crash interrupted")
        assert mbox_messages(path) == expected
        return
    pytest.fail(f"no kill landed inside the rewrite in {ATTEMPTS} attempts")


def test_kill9_during_maildir_deletions_keeps_every_kept_message(make_server):
    server = start_pop3(make_server)
    maildir = maildir_of(server, JOE)
    for attempt in range(ATTEMPTS):
        sent = [big_message(f"d{attempt}-{i}", 2000) for i in range(400)]
        deliver(server, JOE, sent)
        stored = set(maildir_files(maildir, "new").values()) | set(
            maildir_files(maildir, "cur").values())
        client = pop3_client(server, login=JOE)
        count = client.stat()[0]
        assert count == len(stored)
        # Which message each odd number is: TOP 0 reads the header alone (RETR
        # would make each \Seen, a rename of its own at QUIT).
        doomed = set()
        for n in range(1, count + 1, 2):
            _, lines, _ = client.top(n, 0)
            tag = next(line for line in lines if line.startswith(b"Subject: "))[9:].decode()
            doomed.add(next(m for m in stored if f"Subject: {tag}\n".encode() in m))
            client.dele(n)
        client.sock.sendall(b"QUIT\r\n")
        deadline = time.monotonic() + 30
        while len(os.listdir(maildir / "new")) + len(os.listdir(maildir / "cur")) == count:
            assert time.monotonic() < deadline, "QUIT never started deleting"
        kill_host(server)
        client.close()
        files = list(maildir_files(maildir, "new").values()) + list(
            maildir_files(maildir, "cur").values())
        on_disk = set(files)
        assert len(files) == len(on_disk), "a message is on disk twice"
        assert on_disk >= stored - doomed, "a kept message is gone"
        assert on_disk <= stored
        gone = len(stored) - len(on_disk)
        server.start()
        client = pop3_client(server, login=JOE)
        try:
            assert client.stat()[0] == len(on_disk)
            client.quit()
        finally:
            client.close()
        if gone < len(doomed):
            print(f"attempt {attempt}: the kill came after {gone} of {len(doomed)} deletions")
            return
        print(f"attempt {attempt}: the kill came after the last deletion; again")
    pytest.fail(f"no kill landed among the deletions in {ATTEMPTS} attempts")
