"""nmap's ``smtp-open-relay`` script against the mta and submission ports.

The script (/usr/share/nmap/scripts/smtp-open-relay.nse) tries 16 MAIL FROM / RCPT
TO combinations aimed at ``relaytest@DOMAIN`` (percent hack, source routes, bang
paths, quoted local parts, address literals of ``smtp-open-relay.ip``) and prints
one of:

* ``Server is an open relay (N/16 tests)``;
* ``Server doesn't seem to be an open relay, all tests failed``;
* ``Server isn't an open relay, authentication needed`` (a 530 reply).

Its portrule only fires on ports 25/465/587 or services detected as SMTP; the
``+`` before the script name makes nmap run it on our test ports anyway.  The
scan comes from 127.0.0.1, so ``relay.mynetworks = []`` stands for "the world";
a control run with the default mynetworks (127.0.0.0/8) must find the open relay,
so the test can tell the two apart.
"""
import re
import subprocess

import pytest

from tests.integration.harness import LOOPBACK, find_program, tls_server

pytestmark = pytest.mark.integration

NOT_OPEN = "Server doesn't seem to be an open relay, all tests failed"
AUTH_NEEDED = "Server isn't an open relay, authentication needed"
OPEN = re.compile(r"Server is an open relay \((\d+)/16 tests\)")


def nmap(port):
    program = find_program("nmap")
    if program is None:
        pytest.fail("nmap is not installed; the integration tests need the Debian package "
                    "(`bash .ci/test-all` installs it)")
    argv = [program, "-n", "-Pn", "-sT", "-p", str(port), "--script", "+smtp-open-relay",
            "--script-args", f"smtp-open-relay.domain=example.org,smtp-open-relay.ip={LOOPBACK}",
            "--script-timeout", "60s", LOOPBACK]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"nmap exited {p.returncode}\n{p.stdout}{p.stderr}"
    assert re.search(rf"^{port}/tcp +open ", p.stdout, re.M), p.stdout
    m = re.search(r"^\|_? ?smtp-open-relay: (.*)$", p.stdout, re.M)
    assert m, f"the script printed nothing\n{p.stdout}"
    return m.group(1).strip(), p.stdout


@pytest.fixture
def closed_server(make_server):
    return tls_server(make_server, {"relay": {"mynetworks": []}}, roles=("submission",))


def test_mta_port_is_not_an_open_relay(closed_server):
    server = closed_server
    verdict, out = nmap(server.port)
    assert verdict == NOT_OPEN, out
    assert server.spool() == []
    log = server.log_text()
    # the script really tried: relay denials (and syntax refusals), nothing accepted
    assert len(re.findall(r"NOQUEUE: reject: RCPT from \S+: 554 5\.7\.1 ", log)) >= 5, log[-4000:]
    assert "(queued)" not in log


def test_submission_port_needs_authentication(closed_server):
    """(The submissions port is left out: nmap first waits 10 s for a clear-text banner
    there, twice, before it tries TLS; MAIL without AUTH on it is tested elsewhere.)"""
    server = closed_server
    verdict, out = nmap(server.submission_port)
    assert verdict == AUTH_NEEDED, out
    assert server.spool() == []
    assert "(queued)" not in server.log_text()


def test_control_the_script_does_find_an_open_relay(make_server):
    """With the default mynetworks the scanning address (127.0.0.1) may relay on the
    mta port: nmap must say so, or the checks above prove nothing."""
    server = tls_server(make_server, roles=())
    verdict, out = nmap(server.port)
    m = OPEN.match(verdict)
    assert m and int(m.group(1)) >= 1, out
