"""The smart host path: mailsys relays everything through a second mailsys's
submission listener, with STARTTLS verified against that server's self-signed
certificate (trusted through SSL_CERT_FILE, which OpenSSL's default paths --
the platform trust the courier uses -- honour) and AUTH PLAIN."""
import pytest

from tests.integration.harness import HarnessError, lmtp_socket_path, tls_server, to_toml, wait_for_files
from tests.integration.test_remote_delivery import PASSWORD, dns_server, sender_host  # noqa: F401

pytestmark = pytest.mark.integration


def credentials(path, mode=0o600):
    path.write_text(f"joe@example.com:{PASSWORD}\n")
    path.chmod(mode)
    return path


def smarthost(make_server):
    dest = tls_server(make_server, {"server": {"hostname": "smtp.dest.test"},
                                    "domains": {"local": ["example.net"]}},
                      roles=("submission",), start=False, name="smarthost")
    dest.config["listen"]["lmtp"] = [f"unix:{lmtp_socket_path(dest.base)}"]
    dest.config_path.write_text(to_toml(dest.config))
    return dest.start()


def test_smarthost_auth_over_verified_starttls(make_server, dns_server, tmp_path,  # noqa: F811
                                               monkeypatch):
    dest = smarthost(make_server)
    dns = dns_server([])
    monkeypatch.setenv("SSL_CERT_FILE", str(dest.certificate))
    creds = credentials(tmp_path / "smarthost.pw")
    relay = f"[127.0.0.1]:{dest.submission_port}"
    server = sender_host(make_server, dns, relay={"smarthost": relay,
                                                  "smarthost_auth": str(creds)})
    server.start()
    with server.smtp() as c:
        c.sendmail("joe@example.com", ["bob@example.net"],
                   b"From: joe@example.com\r\nSubject: via smart host\r\n\r\nhello\r\n")
    hop = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{dest.submission_port}"
    server.wait_for_log(rf"Verified TLS connection established to {hop}: TLSv1\.[23] with "
                        r"cipher \S+", timeout=60)
    server.wait_for_log(rf"authenticated to {hop} as joe@example\.com")
    server.wait_for_log(rf"to=<bob@example\.net>, relay={hop}, delay=[\d.]+, dsn=2\.0\.0, "
                        r"status=sent \(Ok: queued as \S+\)")
    maildir = dest.base / "mail" / "example.net" / "bob" / "Maildir"
    [stored] = wait_for_files(maildir, 1).values()
    assert b"Subject: via smart host" in stored
    assert PASSWORD not in server.log_text()
    dest.wait_for_log(r"sasl_username=joe@example\.com")


def test_smarthost_untrusted_certificate_defers(make_server, dns_server, tmp_path):  # noqa: F811
    dest = smarthost(make_server)
    dns = dns_server([])
    creds = credentials(tmp_path / "smarthost.pw")
    server = sender_host(make_server, dns, relay={
        "smarthost": f"[127.0.0.1]:{dest.submission_port}", "smarthost_auth": str(creds)})
    server.start()
    with server.smtp() as c:
        c.sendmail("joe@example.com", ["bob@example.net"], b"Subject: x\r\n\r\nhello\r\n")
    hop = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{dest.submission_port}"
    server.wait_for_log(rf"to=<bob@example\.net>, relay={hop}, delay=[\d.]+, dsn=4\.7\.5, "
                        rf"status=deferred \(TLS handshake with {hop} failed: .*certificate "
                        r"verify failed", timeout=60)
    # No plaintext fallback under encrypt, and the password never left.
    assert "sasl_username" not in dest.log_text()


def test_credentials_file_must_be_private(make_server, tmp_path):
    creds = credentials(tmp_path / "smarthost.pw", mode=0o644)
    server = make_server({"relay": {"smarthost": "[127.0.0.1]:2525",
                                    "smarthost_auth": str(creds)}}, start=False)
    with pytest.raises(HarnessError, match="exited"):
        server.start(timeout=30)
    out = server.output_path.read_text() + server.log_text()
    assert f"{creds} has mode 0644" in out
    assert f"chmod 600 {creds}" in out
    p = server.mailsys_cli("config", "check")
    assert p.returncode == 2
    assert f"relay.smarthost_auth: {creds} has mode 0644" in p.stderr
