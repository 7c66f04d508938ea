"""Who the client is, on a real ``twistd -n mailsys``: its name (forward-confirmed
reverse DNS, from a DNS server on loopback), the reverse lookups' own threads
(a name server that never answers must not hold up AUTH), and its address on a
dual-stack ``tcp6`` listener (an IPv4 client is its IPv4 address).

Clients use loopback source addresses other than 127.0.0.1 (which is
``localhost`` without a query) so that the server looks their names up."""
import re
import smtplib
import socket
import ssl
import time

import pytest

from tests.integration.dnsserver import DNSServer, zone
from tests.integration.harness import LOOPBACK, received_fields, split_received, tls_server

pytestmark = pytest.mark.integration

PASSWORD = "integration test password"


def send(server, source, rcpt="joe@example.com", helo="client.example.org", host=LOOPBACK):
    """One message on the mta port from ``source``; its queue id."""
    msg = b"Subject: who\r\n\r\nHello.\r\n"
    with smtplib.SMTP(host, server.port, local_hostname=helo, timeout=30,
                      source_address=(source, 0)) as c:
        c.ehlo()
        assert c.mail("alice@example.org") == (250, b"2.1.0 Ok")
        assert c.rcpt(rcpt) == (250, b"2.1.5 Ok")
        code, text = c.data(msg)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def stored(server, qid):
    (entry,) = [e for e in server.spool() if e.queue_id == qid]
    return entry


def test_ptr_name_is_used_only_when_its_address_points_back(make_server, tmp_path):
    """127.0.0.2's PTR says mail.google.com, whose A record is 192.0.2.1: the
    client is unknown in the log and in Received, and a warning says why, as
    Postfix's smtpd logs it.  127.0.0.3's PTR name has 127.0.0.3 as its address:
    that name is used."""
    forward = zone(["mail.google.com. IN A 192.0.2.1", "mx.google.com. IN A 127.0.0.3"],
                   origin="google.com.")
    reverse = zone(["2.0.0.127.in-addr.arpa. IN PTR mail.google.com.",
                    "3.0.0.127.in-addr.arpa. IN PTR mx.google.com."], origin="127.in-addr.arpa.")
    with DNSServer(tmp_path / "dns", forward, reverse) as dns:
        server = make_server({"dns": {"nameservers": [dns.nameserver], "timeout": 5}})
        forged = send(server, "127.0.0.2")
        confirmed = send(server, "127.0.0.3")
    log = server.log_since_start()
    assert re.search(r"\] connect from unknown\[127\.0\.0\.2\]\n", log), log
    assert "warning: hostname mail.google.com does not resolve to address 127.0.0.2\n" in log
    assert re.search(r"\] connect from mx\.google\.com\[127\.0\.0\.3\]\n", log), log
    assert "mail.google.com[" not in log
    assert received_fields(stored(server, forged).read_message())[0].startswith(
        f"Received: from client.example.org (unknown [127.0.0.2]) by {server.config['server']['hostname']}")
    assert stored(server, forged).envelope["client"]["name"] == "unknown"
    assert received_fields(stored(server, confirmed).read_message())[0].startswith(
        "Received: from client.example.org (mx.google.com [127.0.0.3]) by ")


def test_reverse_lookups_that_never_end_do_not_delay_auth(make_server):
    """30 new clients whose PTR queries go to a name server that never answers
    (dns.timeout 5 s) wait for their banners; meanwhile an AUTH on the submission
    port (its Argon2id check runs in the reactor's thread pool) is answered at
    once.  When the lookups shared that pool (10 threads) it waited 15 s.  Every
    waiting client has its banner, as unknown, once dns.timeout has passed."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)    # reads nothing, ever
    silent.bind((LOOPBACK, 0))
    clients = []
    try:
        server = tls_server(make_server, {
            "server": {"workers": 1},
            "dns": {"nameservers": [f"{LOOPBACK}:{silent.getsockname()[1]}"], "timeout": 5}},
            roles=("submission",))
        started = time.monotonic()
        for n in range(2, 32):
            s = socket.socket()
            s.settimeout(30)
            s.bind((f"127.0.0.{n}", 0))
            s.connect((LOOPBACK, server.port))
            clients.append(s)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP(LOOPBACK, server.submission_port, timeout=30) as c:
            c.starttls(context=context)
            before = time.monotonic()
            assert c.login("joe@example.com", PASSWORD) == (235, b"2.7.0 Authentication successful")
            took = time.monotonic() - before
        assert took < 3.0, f"AUTH took {took:.1f} s behind the reverse lookups"
        for s in clients:
            assert s.recv(100) == f"220 {server.config['server']['hostname']} ESMTP\r\n".encode()
        waited = time.monotonic() - started
        assert waited < 8.0, f"the last banner came after {waited:.1f} s"
        log = server.log_since_start()
        for n in range(2, 32):
            assert f"] connect from unknown[127.0.0.{n}]\n" in log
    finally:
        for s in clients:
            s.close()
        silent.close()


def test_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address(make_server):
    """mta on ``tcp6:PORT:interface=\\:\\:`` (as etc/mailsys.toml suggests): a client
    on 127.0.0.1 is 127.0.0.1, not ::ffff:127.0.0.1, so relay.mynetworks lets it
    relay, and the log and Received name it as on an IPv4 listener."""
    server = make_server(start=False)
    server.config["listen"]["mta"] = [f"tcp6:{server.port}:interface=\\:\\:"]
    server.config["server"]["workers"] = 1
    from tests.integration.harness import to_toml

    server.config_path.write_text(to_toml(server.config))
    server.start()
    qid = send(server, LOOPBACK, rcpt="someone@relayed.example")
    log = server.log_since_start()
    assert re.search(r"\] connect from localhost\[127\.0\.0\.1\]\n", log), log
    assert re.search(rf"\] {qid}: client=localhost\[127\.0\.0\.1\]\n", log), log
    assert "ffff" not in log
    entry = stored(server, qid)
    received, _ = split_received(entry.read_message())
    assert received.startswith(b"Received: from client.example.org (localhost [127.0.0.1])\r\n")
    assert entry.envelope["client"]["ip"] == "127.0.0.1"
    assert entry.envelope["recipients"][0]["rcpt"] == "someone@relayed.example"
