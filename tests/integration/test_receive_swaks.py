"""swaks, the SMTP test tool admins use, against a real mailsys on loopback."""
import re
import subprocess

import pytest

from tests.integration.harness import find_program, split_received

pytestmark = pytest.mark.integration


def swaks(server, *extra, marker):
    program = find_program("swaks")
    if program is None:
        pytest.fail("swaks is not installed; the integration tests need the Debian package "
                    "(`bash .ci/test-all` installs it)")
    argv = [program, "--server", f"127.0.0.1:{server.port}", "--to", "joe@example.com",
            "--from", "alice@example.org", "--helo", "swaks.example.org",
            "--header", f"Subject: {marker}", "--body", f"body of {marker}",
            "--timeout", "30", *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"swaks exited {p.returncode}\n{p.stdout}{p.stderr}"
    m = re.search(r"^<[-~*]* +250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)$", p.stdout, re.M)
    assert m, p.stdout
    return m.group(1), p.stdout


def data_sent(out):
    """The message as swaks shows it sent: the ``-> `` lines between 354 and the dot."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354 ")) + 1
    end = lines.index(" -> .", start)
    assert all(line.startswith(" -> ") for line in lines[start:end]), lines[start:end]
    return "".join(line[4:] + "\r\n" for line in lines[start:end]).encode()


def check_spooled(server, qid, marker, out):
    (entry,) = server.spool()
    assert entry.queue_id == qid
    assert entry.envelope["sender"] == "alice@example.org"
    assert entry.envelope["recipients"] == [{"rcpt": "joe@example.com", "state": "queued"}]
    assert entry.envelope["client"]["helo"] == "swaks.example.org"
    received, rest = split_received(entry.read_message())
    assert received.startswith(b"Received: from swaks.example.org (localhost [127.0.0.1])\r\n")
    assert f"\r\nSubject: {marker}\r\n".encode() in b"\r\n" + rest
    assert f"\r\n\r\nbody of {marker}\r\n".encode() in rest
    assert rest == data_sent(out)


def test_swaks_plain(server):
    qid, out = swaks(server, marker="swaks-plain")
    assert "<-  220 mx.mailsys.test ESMTP" in out
    assert "<-  250 2.1.5 Ok" in out
    assert "<-  221 2.0.0 Bye" in out
    check_spooled(server, qid, "swaks-plain", out)


def test_swaks_pipelining(server):
    qid, out = swaks(server, "--pipeline", marker="swaks-pipelined")
    # swaks sends MAIL, RCPT and DATA in one write only when PIPELINING is offered.
    assert re.search(r"^ -> MAIL FROM:<alice@example\.org>\n -> RCPT TO:<joe@example\.com>\n"
                     r" -> DATA\n", out, re.M), out
    check_spooled(server, qid, "swaks-pipelined", out)
    server.wait_for_log(r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=1 data=1 quit=1$")
