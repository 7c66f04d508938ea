"""Remote delivery end to end: mailsys looks up MX records on a real DNS server on
loopback and delivers with its SMTP client to real peers (Postfix, a second
mailsys, a scripted server); a permanent refusal comes back as a bounce in the
sender's own mailbox.  Only 127.0.0.1 and ::1 are ever contacted."""
import email
import email.policy
import re
import smtplib
import ssl
import time

import pytest

from tests.integration.dnsserver import DNSServer, zone
from tests.integration.harness import (
    LOOPBACK, PostfixMXPeer, lmtp_socket_path, merge, tls_server, to_toml, wait_for_files,
)
from tests.integration.scripted_smtp import ScriptedSMTP

pytestmark = pytest.mark.integration

PASSWORD = "integration test password"


@pytest.fixture
def dns_server(tmp_path):
    servers = []

    def make(records):
        server = DNSServer(tmp_path / f"dns{len(servers)}", zone(records)).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def postfix_mx(tmp_path):
    peers = []

    def make(domains, mailboxes):
        peer = PostfixMXPeer(tmp_path / f"postfixmx{len(peers)}", domains, mailboxes)
        peers.append(peer)
        return peer.start()

    yield make
    for p in peers:
        p.stop()


def sender_host(make_server, dns, transport=None, relay=None, name="sender", **sections):
    """mailsys that sends: submission with STARTTLS + AUTH, an LMTP MDA for its own
    bounces, example.com local only, DNS at ``dns``."""
    overrides = {"dns": {"nameservers": [dns.nameserver], "timeout": 2},
                 "domains": {"local": ["example.com"]},
                 "relay": dict({"transport": transport or {}, "outbound_tls": "may"}, **(relay or {})),
                 "queue": {"retry_min": 1, "retry_max": 2}}
    overrides = merge(overrides, sections)
    server = tls_server(make_server, overrides, roles=("submission",), start=False, name=name)
    sock = lmtp_socket_path(server.base)
    server.config["listen"]["lmtp"] = [f"unix:{sock}"]
    server.config_path.write_text(to_toml(server.config))
    server.mail_root = server.base / "mail"
    return server


def submit(server, rcpts, body, sender="joe@example.com", subject="remote test", rcpt_options=()):
    message = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.monotonic_ns()}@example.com>\r\n\r\n{body}\r\n").encode()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(LOOPBACK, server.submission_port, local_hostname="client.test",
                      timeout=30) as c:
        c.ehlo()
        c.starttls(context=context)
        c.ehlo()
        c.login("joe@example.com", PASSWORD)
        refused = c.sendmail(sender, rcpts, message, rcpt_options=list(rcpt_options))
        assert refused == {}
    return message


def bounce_report(server, timeout=60):
    """The one bounce in joe@example.com's Maildir, parsed."""
    maildir = server.mail_root / "example.com" / "joe" / "Maildir"
    [name] = wait_for_files(maildir, 1, timeout=timeout)
    return email.message_from_bytes((maildir / "new" / name).read_bytes(),
                                    policy=email.policy.default)


def status_fields(report):
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    raw = re.sub(r"\r?\n[ \t]+", " ", status.as_bytes().decode())   # unfold
    return dict(re.findall(r"^([A-Za-z-]+): (.*?)\r?$", raw, re.M))


def test_mx_lookup_delivery_to_postfix(make_server, dns_server, postfix_mx):
    peer = postfix_mx(["remote.test"], ["rcpt@remote.test"])
    dns = dns_server(["remote.test. IN MX 10 mx.remote.test.",
                      "mx.remote.test. IN A 127.0.0.1"])
    # smtp:remote.test:PORT = MX lookup of remote.test, then port PORT.
    server = sender_host(make_server, dns, {"remote.test": f"smtp:remote.test:{peer.port}"})
    server.start()
    message = submit(server, ["rcpt@remote.test"], "hello over MX")
    server.wait_for_log(rf"to=<rcpt@remote.test>, relay=mx\.remote\.test\[127\.0\.0\.1\]:"
                        rf"{peer.port}, delay=[\d.]+, dsn=2\.0\.0, status=sent \(Ok: "
                        r"queued as \w+\)", timeout=60)
    [name] = wait_for_files(peer.maildir("rcpt@remote.test"), 1)
    stored = (peer.maildir("rcpt@remote.test") / "new" / name).read_bytes()
    assert stored.endswith(message.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    assert b"Subject: remote test\n" in stored
    peer.wait_for_log(r"from=<joe@example.com>")
    # Postfix offers STARTTLS only when configured; ours did not: plaintext, no failure.
    assert "TLS handshake" not in server.log_text()


def test_success_request_travels_to_postfix_which_reports_not_we(make_server, dns_server,
                                                                  postfix_mx):
    """NOTIFY=SUCCESS for a recipient behind a server that offers DSN (Postfix does):
    the request goes on with the RCPT, Postfix sends the success notice, and we
    send none (RFC 3461 5.2): the sender must not get two."""
    peer = postfix_mx(["remote.test"], ["rcpt@remote.test"])
    dns = dns_server(["remote.test. IN MX 10 mx.remote.test.",
                      "mx.remote.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns, {"remote.test": f"smtp:remote.test:{peer.port}"})
    server.start()
    submit(server, ["rcpt@remote.test"], "hi", subject="dsn", rcpt_options=["NOTIFY=SUCCESS"])
    sent = server.wait_for_log(r"(\w+): to=<rcpt@remote.test>, relay=mx\.remote\.test.*status=sent",
                               timeout=60)
    qid = sent.group(1)
    server.wait_for_log(rf"{qid}: removed", timeout=30)
    # Postfix got the request: its delivery agent sends the sender a success notice.
    peer.wait_for_log(r"sender delivery status notification")
    # We did not: the success report would have been logged before "removed".
    assert "success notification" not in server.log_text()
    assert not list((server.mail_root / "example.com" / "joe" / "Maildir" / "new").glob("*"))


def test_long_lines_reach_postfix_folded(make_server, dns_server, postfix_mx):
    """A body line of 3,000 octets (legal to receive, over RFC 5321's 1,000 to send)
    goes out broken with CRLF SPACE, as Postfix's own client would send it: what
    the real Postfix stores has no line over 998 octets and unfolds to ours.
    (Postfix's smtpd would have stored the long line whole: it rejoins what it
    reads in pieces.)"""
    peer = postfix_mx(["remote.test"], ["rcpt@remote.test"])
    dns = dns_server(["remote.test. IN MX 10 mx.remote.test.",
                      "mx.remote.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns, {"remote.test": f"smtp:remote.test:{peer.port}"})
    server.start()
    long_line = "".join(chr(ord("a") + i % 26) for i in range(3000))
    submit(server, ["rcpt@remote.test"], f"before\r\n{long_line}\r\nafter")
    server.wait_for_log(r"to=<rcpt@remote.test>, relay=mx\.remote\.test.*status=sent", timeout=60)
    [name] = wait_for_files(peer.maildir("rcpt@remote.test"), 1)
    stored = (peer.maildir("rcpt@remote.test") / "new" / name).read_bytes()
    body = stored.split(b"\n\n", 1)[1]
    assert body.split(b"\n") == [b"before", long_line[:998].encode(),
                                  b" " + long_line[998:1995].encode(),
                                  b" " + long_line[1995:2992].encode(),
                                  b" " + long_line[2992:].encode(), b"after", b""]
    assert body.replace(b"\n ", b"") == f"before\n{long_line}\nafter\n".encode()


def test_permanent_refusal_bounces_to_sender(make_server, dns_server):
    with ScriptedSMTP({"RCPT": "550 5.1.1 <nobody@bounce.test>: Recipient address rejected"}) as peer:
        dns = dns_server(["bounce.test. IN MX 10 mx.bounce.test.",
                          "mx.bounce.test. IN A 127.0.0.1"])
        server = sender_host(make_server, dns, {"bounce.test": f"smtp:bounce.test:{peer.port}"})
        server.start()
        submit(server, ["nobody@bounce.test"], "this will bounce")
        server.wait_for_log(rf"to=<nobody@bounce.test>, relay=mx\.bounce\.test\[127\.0\.0\.1\]:"
                            rf"{peer.port}, delay=[\d.]+, dsn=5\.1\.1, status=bounced \(<nobody@"
                            r"bounce\.test>: Recipient address rejected\)", timeout=60)
        report = bounce_report(server)
        fields = status_fields(report)
        assert fields["Final-Recipient"] == "rfc822; nobody@bounce.test"
        assert fields["Status"] == "5.1.1"
        assert fields["Action"] == "failed"
        assert fields["Remote-MTA"] == "dns; mx.bounce.test"
        assert fields["Diagnostic-Code"] == ("smtp; 550 5.1.1 <nobody@bounce.test>: Recipient "
                                             "address rejected")
        envelope = [c for c in peer.commands if c.startswith(("MAIL", "RCPT", "DATA"))]
        assert len(envelope) == 2, peer.commands
        assert re.fullmatch(r"MAIL FROM:<joe@example\.com> SIZE=\d+", envelope[0])
        assert envelope[1] == "RCPT TO:<nobody@bounce.test>"
        assert peer.messages == []


def test_postmaster_alias_to_a_refusing_address_does_not_loop(make_server, dns_server):
    """A bounce from elsewhere (mail from <>) that fails goes to the postmaster,
    once.  Here the postmaster alias leads to an address that refuses mail too:
    the notice's copy for it fails, and must not cause another notice (it did,
    about a hundred a second, for as long as the alias stayed so)."""
    with ScriptedSMTP({"RCPT": "550 5.1.1 User unknown"}) as peer:
        dns = dns_server(["refuse.test. IN MX 10 mx.refuse.test.",
                          "mx.refuse.test. IN A 127.0.0.1"])
        server = sender_host(make_server, dns, {"refuse.test": f"smtp:refuse.test:{peer.port}"})
        server.aliases_path.write_text("postmaster@example.com: pm@refuse.test\n")
        server.start()
        with smtplib.SMTP(LOOPBACK, server.port, local_hostname="client.test", timeout=30) as c:
            assert c.sendmail("", ["user@refuse.test"], b"Subject: a bounce\r\n\r\nx\r\n") == {}
        server.wait_for_log(r"(\w+): postmaster notification not sent: the message failed on "
                            r"its way to <postmaster@example\.com>; check the postmaster alias",
                            timeout=60)
        time.sleep(2)       # what a loop would have sent meanwhile: about 200 more
        rcpts = [c.split()[1] for c in peer.commands if c.startswith("RCPT")]
        assert rcpts == ["TO:<user@refuse.test>", "TO:<pm@refuse.test>"], rcpts
        log = server.log_text()
        assert len(re.findall(r"postmaster failure notification", log)) == 1
        assert len(re.findall(r"postmaster notification not sent", log)) == 1


def test_dns_failures(make_server, dns_server):
    dns = dns_server(["null.test. IN MX 0 .",
                      "servfail.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns)
    server.start()
    submit(server, ["a@nx.test", "b@null.test"], "dns failures")
    submit(server, ["c@servfail.test"], "dns trouble")
    server.wait_for_log(r"to=<a@nx\.test>, relay=none, delay=[\d.]+, dsn=5\.1\.2, status=bounced "
                        r"\(Host or domain name not found\. Name service error for name=nx\.test "
                        r"type=MX: Host not found\)", timeout=60)
    server.wait_for_log(r"to=<b@null\.test>, relay=none, delay=[\d.]+, dsn=5\.1\.10, "
                        r"status=bounced \(Domain null\.test does not accept mail \(null MX, "
                        r"RFC 7505\)\)")
    server.wait_for_log(r"to=<c@servfail\.test>, relay=none, delay=[\d.]+, dsn=4\.4\.3, "
                        r"status=deferred \(Host or domain name not found\. Name service error "
                        r"for name=servfail\.test type=MX: Host not found, try again\)")
    report = bounce_report(server)
    raw = report.as_bytes().decode()
    assert "Final-Recipient: rfc822; a@nx.test" in raw
    assert "Final-Recipient: rfc822; b@null.test" in raw
    assert "Status: 5.1.10" in raw


def test_ipv6_mx_and_fallback_to_next_mx(make_server, dns_server):
    # Two servers on the same port: the busy one on 127.0.0.1, the good one on ::1.
    import socket
    import socketserver
    import threading

    port = None
    for _ in range(50):
        from tests.integration.harness import free_port
        port = free_port()
        try:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s6.bind(("::1", port))
            s6.close()
            break
        except OSError:
            continue
    served = []

    class Good(socketserver.StreamRequestHandler):
        def handle(self):
            w = self.wfile.write
            w(b"220 v6.remote.test ESMTP\r\n")
            data = b""
            for line in self.rfile:
                served.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    w(b"250-v6.remote.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    w(b"354 go\r\n")
                    for body in self.rfile:
                        if body == b".\r\n":
                            break
                        data += body
                    w(b"250 2.0.0 Ok: queued on v6\r\n")
                elif verb == b"QUIT":
                    w(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    w(b"250 2.0.0 Ok\r\n")

    class V6Server(socketserver.ThreadingTCPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        allow_reuse_address = True

    class Busy(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"421 4.3.2 busy, try the next MX\r\n")

    class V4Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    v6 = V6Server(("::1", port), Good)
    v4 = V4Server((LOOPBACK, port), Busy)
    for srv in (v6, v4):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        dns = dns_server(["six.test. IN MX 10 busy.six.test.",
                          "six.test. IN MX 20 v6.six.test.",
                          "busy.six.test. IN A 127.0.0.1",
                          "v6.six.test. IN AAAA ::1"])
        server = sender_host(make_server, dns, {"six.test": f"smtp:six.test:{port}"})
        server.start()
        submit(server, ["x@six.test"], "over ipv6")
        server.wait_for_log(rf"to=<x@six\.test>, relay=v6\.six\.test\[::1\]:{port}, "
                            r"delay=[\d.]+, dsn=2\.0\.0, status=sent \(Ok: queued on v6\)",
                            timeout=60)
        assert b"RCPT TO:<x@six.test>\r\n" in served
        assert b"EHLO mx.mailsys.test\r\n" in served
    finally:
        for srv in (v6, v4):
            srv.shutdown()
            srv.server_close()


def test_self_mx_is_a_loop(make_server, dns_server):
    dns = dns_server(["loop.test. IN MX 10 mx.mailsys.test.",
                      "mx.mailsys.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns)
    server.start()
    submit(server, ["x@loop.test"], "loop")
    server.wait_for_log(r"to=<x@loop\.test>, relay=none, delay=[\d.]+, dsn=5\.4\.6, "
                        r"status=bounced \(mail for loop\.test loops back to myself \(the best "
                        r"MX host is this host\)\)", timeout=60)


def test_connection_refused_defers_and_logs(make_server, dns_server):
    from tests.integration.harness import free_port

    port = free_port()     # nothing listens there
    dns = dns_server(["down.test. IN MX 10 mx.down.test.", "mx.down.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns, {"down.test": f"smtp:down.test:{port}"})
    server.start()
    submit(server, ["x@down.test"], "down")
    server.wait_for_log(rf"connect to mx\.down\.test\[127\.0\.0\.1\]:{port}: Connection refused",
                        timeout=60)
    server.wait_for_log(rf"to=<x@down\.test>, relay=none, delay=[\d.]+, dsn=4\.4\.1, "
                        rf"status=deferred \(connect to mx\.down\.test\[127\.0\.0\.1\]:{port}: "
                        r"Connection refused\)")


def test_to_a_second_mailsys_with_starttls(make_server, dns_server):
    dest = tls_server(make_server, {"server": {"hostname": "mx.dest.test"},
                                    "domains": {"local": ["example.net"]}},
                      roles=("submission",), start=False, name="dest")
    sock = lmtp_socket_path(dest.base)
    dest.config["listen"]["lmtp"] = [f"unix:{sock}"]
    dest.config_path.write_text(to_toml(dest.config))
    dest.start()
    dns = dns_server(["example.net. IN MX 10 mx.dest.test.", "mx.dest.test. IN A 127.0.0.1"])
    server = sender_host(make_server, dns, {"example.net": f"smtp:example.net:{dest.port}"})
    server.start()
    submit(server, ["bob@example.net"], "to the other mailsys")
    server.wait_for_log(rf"Anonymous TLS connection established to mx\.dest\.test\[127\.0\.0\.1\]:"
                        rf"{dest.port}: TLSv1\.[23] with cipher \S+", timeout=60)
    server.wait_for_log(rf"to=<bob@example.net>, relay=mx\.dest\.test\[127\.0\.0\.1\]:"
                        rf"{dest.port}, delay=[\d.]+, dsn=2\.0\.0, status=sent \(Ok: queued as "
                        r"\S+\)")
    maildir = dest.base / "mail" / "example.net" / "bob" / "Maildir"
    [name] = wait_for_files(maildir, 1)
    stored = (maildir / "new" / name).read_bytes()
    assert b"Subject: remote test" in stored
    assert b"to the other mailsys" in stored
