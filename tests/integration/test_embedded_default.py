"""The embedded default (CONTRACT section 4), exactly as the README starts it:
``twistd -n mailsys`` with no configuration in an empty directory, an account
added with ``mailsys user add``, then real clients: swaks on the mta port and
msmtp through submission (STARTTLS) and submissions (implicit TLS) with the
self-signed certificate the server made on its first start.

The embedded default resolves with /etc/resolv.conf, and this machine may send no
query outside loopback: the server runs in a mount namespace of its own where
/etc/resolv.conf names 127.0.0.1, where nothing answers (mail for other domains
then waits in the queue, as it would during a DNS outage)."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.harness import REPO_ROOT, TWISTD, port_accepts
from mailsys.spool import read_spool

pytestmark = pytest.mark.integration

PORTS = (2525, 2587, 2465)


@pytest.fixture
def embedded(tmp_path):
    busy = [p for p in PORTS if port_accepts(p, timeout=0.2)]
    assert not busy, f"ports of the embedded default already in use: {busy}"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("MAILSYS_CONFIG", None)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    private_dns = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                   str(resolv)]
    proc = subprocess.Popen(private_dns + TWISTD + ["-n", "--pidfile=", "--logfile=twistd.log", "mailsys"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not all(port_accepts(p, timeout=0.2) for p in PORTS):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (tmp_path / "twistd.log").read_text() if (tmp_path / "twistd.log").exists() else ""
            pytest.fail(f"embedded default did not start: {proc.stderr.read()!r}\n{log[-3000:]}")
        time.sleep(0.1)
    yield tmp_path, env
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mailsys(cwd, env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mailsys", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_embedded_default_end_to_end(embedded):
    cwd, env = embedded
    assert (cwd / "var" / "tls" / "fullchain.pem").exists()
    assert oct((cwd / "var" / "tls" / "privkey.pem").stat().st_mode & 0o777) == "0o600"
    added = mailsys(cwd, env, "user", "add", "you@localhost", "--password-stdin", stdin="s3cret pass\n")
    assert (added.returncode, added.stdout.strip()) == (0, "added you@localhost")

    swaks = subprocess.run(["swaks", "--server", "127.0.0.1:2525", "--to", "you@localhost",
                            "--from", "sender@example.org", "--helo", "client.example"],
                           capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0, swaks.stdout
    assert "<-  250 2.0.0 Ok: queued as " in swaks.stdout

    if shutil.which("msmtp") is None:
        pytest.fail("msmtp is not installed (.ci/test-all installs it)")
    rc = cwd / "msmtprc"
    rc.write_text(
        "defaults\n"
        f"tls_trust_file {cwd / 'var' / 'tls' / 'fullchain.pem'}\n"
        "auth on\nuser you@localhost\npassword \"s3cret pass\"\nfrom you@localhost\n"
        "host 127.0.0.1\n\n"
        "account starttls\nport 2587\ntls on\ntls_starttls on\n\n"
        "account implicit\nport 2465\ntls on\ntls_starttls off\n")
    rc.chmod(0o600)
    for account in ("starttls", "implicit"):
        message = f"Subject: via {account}\nTo: friend@example.net\n\nhello from msmtp\n"
        sent = subprocess.run(["msmtp", "-C", str(rc), "-a", account, "friend@example.net"],
                              input=message, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
    entries = read_spool(str(cwd / "var" / "spool"))
    assert len(entries) == 3
    by_subject = {}
    for e in entries:
        msg = e.read_message()
        subject = [l for l in msg.split(b"\r\n") if l.startswith(b"Subject:")][0]
        by_subject[subject] = e
    for account, role in (("starttls", "submission"), ("implicit", "submissions")):
        e = by_subject[f"Subject: via {account}".encode()]
        assert e.envelope["sender"] == "you@localhost"
        assert [r["rcpt"] for r in e.envelope["recipients"]] == ["friend@example.net"]
        assert e.envelope["client"]["role"] == role
        assert e.envelope["client"]["auth"] == "you@localhost"
        msg = e.read_message()
        assert msg.startswith(b"Received: from ")
        assert b"(Authenticated sender: you@localhost)\r\n\tby " in msg
        assert b" with ESMTPSA id " + e.queue_id.encode() + b"\r\n" in msg
        # RFC 6409 section 8: exactly one Date and one Message-ID, whether msmtp
        # wrote them or the MSA had to add them.
        header = msg.split(b"\r\n\r\n", 1)[0].lower()
        assert header.count(b"\r\nmessage-id: <") == 1
        assert header.count(b"\r\ndate: ") == 1
        assert msg.endswith(b"\r\n\r\nhello from msmtp\r\n")
