"""mailsys.tls: self-signed certificates, the server context (TLS 1.2 minimum,
forward-secret AEAD suites) and its reload when the PEM files change.

Handshakes run in memory: Python's ssl module on a pair of MemoryBIOs as the
client, pyOpenSSL on the server's context with memory BIOs as the server, bytes
pumped between them.  No socket is opened.  Each refusal test first shows that
the same client completes a handshake with a permissive server, so the refusal
is the server's doing and not the client's inability.
"""
import datetime
import ipaddress
import os
import ssl
import stat
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.task import Clock

from mailsys import cli
from mailsys.tls import ServerTLS, TLSError, load_context, write_self_signed
from tests.helpers import logged  # noqa: F401  (fixture)


# -- helpers --------------------------------------------------------------------------------

def make_pair(directory, hostname="localhost", name="fullchain.pem", key_name="privkey.pem"):
    cert, key = os.path.join(directory, name), os.path.join(directory, key_name)
    write_self_signed(hostname, cert, key)
    return cert, key


def read_cert(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def context_serial(ctx):
    """The serial number of the certificate a server context presents."""
    return SSL.Connection(ctx, None).get_certificate().get_serial_number()


def handshake(server_ctx, client_ctx):
    """Run a TLS handshake in memory; returns (client result, server result), each
    the negotiated version name or the exception that side raised."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    c_done = s_done = False
    c_err = s_err = None
    for _ in range(200):
        moved = False
        if not c_done and c_err is None:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                c_err = e
        data = c_out.read()
        if data:
            server.bio_write(data)
            moved = True
        if not s_done and s_err is None:
            try:
                server.do_handshake()
                s_done = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                s_err = e
        while True:
            try:
                out = server.bio_read(65536)
            except SSL.WantReadError:
                break
            if not out:
                break
            c_in.write(out)
            moved = True
        if not moved and (c_done or c_err) and (s_done or s_err):
            break
    else:
        raise AssertionError("the in-memory handshake did not settle")
    return (client.version() if c_done else c_err,
            server.get_protocol_version_name() if s_done else s_err)


def client_context(minimum, maximum, ciphers=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLSv1/TLSv1_1 are deprecated names
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def permissive_context(cert, key):
    """A server context that accepts anything from TLS 1.0 on (the control)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
    ctx.use_certificate_file(cert)
    ctx.use_privatekey_file(key)
    return ctx


V = ssl.TLSVersion


@pytest.fixture
def pair(tmp_path):
    return make_pair(str(tmp_path / "tls"))


def log_texts(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_namespace") == "mailsys.tls"]


# -- write_self_signed ------------------------------------------------------------------------

def test_self_signed_certificate_parses_and_names_the_host(tmp_path):
    cert_path, key_path = make_pair(str(tmp_path / "tls"), hostname="mail.example.org")
    cert = read_cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.example.org"
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=365)
    # self-signed: its own public key verifies its signature
    cert.verify_directly_issued_by(cert)
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_self_signed_for_localhost_names_it_once(tmp_path):
    cert = read_cert(make_pair(str(tmp_path))[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_key_mode_is_0600_and_certificate_0644_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        cert, key = make_pair(str(tmp_path / "new" / "dir"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert).st_mode) == 0o644
    # nothing else was left in the directory (no temporary files)
    assert sorted(os.listdir(tmp_path / "new" / "dir")) == ["fullchain.pem", "privkey.pem"]


def test_rewriting_replaces_both_files_with_a_new_serial(tmp_path):
    cert, key = make_pair(str(tmp_path))
    first = read_cert(cert).serial_number
    with open(key, "rb") as f:
        first_key = f.read()
    os.chmod(key, 0o644)          # an operator's mistake is repaired by the rewrite
    make_pair(str(tmp_path))
    assert read_cert(cert).serial_number != first
    with open(key, "rb") as f:
        assert f.read() != first_key
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


# -- the context: what it accepts ---------------------------------------------------------------

def test_context_loads_the_pair(pair):
    ctx = load_context(*pair)
    assert context_serial(ctx) == read_cert(pair[0]).serial_number


def test_tls_1_1_client_is_refused(pair):
    client = client_context(V.TLSv1_1, V.TLSv1_1, "ALL:@SECLEVEL=0")
    # control: this client can speak TLS 1.1 to a server that allows it
    assert handshake(permissive_context(*pair), client) == ("TLSv1.1", "TLSv1.1")
    c, s = handshake(load_context(*pair), client)
    assert isinstance(s, SSL.Error) and isinstance(c, ssl.SSLError), (c, s)
    assert "unsupported protocol" in str(s)


def test_tls_1_0_client_is_refused(pair):
    client = client_context(V.TLSv1, V.TLSv1, "ALL:@SECLEVEL=0")
    assert handshake(permissive_context(*pair), client) == ("TLSv1", "TLSv1")
    c, s = handshake(load_context(*pair), client)
    assert isinstance(s, SSL.Error) and isinstance(c, ssl.SSLError), (c, s)


@pytest.mark.parametrize("maximum,expected", [(V.TLSv1_2, "TLSv1.2"), (V.TLSv1_3, "TLSv1.3")])
def test_tls_1_2_and_1_3_clients_are_served(pair, maximum, expected):
    client = client_context(V.TLSv1_2, maximum)
    assert handshake(load_context(*pair), client) == (expected, expected)


def test_a_client_that_prefers_old_versions_gets_at_least_1_2(pair):
    client = client_context(V.TLSv1, V.TLSv1_3, "ALL:@SECLEVEL=0")
    c, s = handshake(load_context(*pair), client)
    assert c == s and c in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_tls_1_2_without_forward_secret_aead_is_refused(pair, suite):
    client = client_context(V.TLSv1_2, V.TLSv1_2, f"{suite}:@SECLEVEL=0")
    assert handshake(permissive_context(*pair), client) == ("TLSv1.2", "TLSv1.2")
    c, s = handshake(load_context(*pair), client)
    assert isinstance(s, SSL.Error), (c, s)


@pytest.mark.parametrize("damage", ["garbage", "no-cert", "other-key", "missing-key", "empty"])
def test_unusable_files_are_a_tls_error(tmp_path, damage):
    cert, key = make_pair(str(tmp_path / "a"))
    other_cert, other_key = make_pair(str(tmp_path / "b"))
    if damage == "garbage":
        with open(cert, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif damage == "no-cert":
        with open(cert, "wb") as f:
            f.write(b"hello\n")
    elif damage == "other-key":
        key = other_key
    elif damage == "missing-key":
        key = str(tmp_path / "nope.pem")
    elif damage == "empty":
        open(key, "wb").close()
    with pytest.raises(TLSError):
        load_context(cert, key)


def test_a_chain_file_serves_the_leaf_first(tmp_path):
    cert, key = make_pair(str(tmp_path / "leaf"))
    intermediate, _ = make_pair(str(tmp_path / "int"), hostname="intermediate.example")
    with open(cert, "ab") as f, open(intermediate, "rb") as g:
        f.write(g.read())
    ctx = load_context(cert, key)
    assert context_serial(ctx) == read_cert(os.path.join(tmp_path, "leaf", "fullchain.pem")).serial_number
    client = client_context(V.TLSv1_2, V.TLSv1_3)
    assert handshake(ctx, client)[1] == "TLSv1.3"


# -- ServerTLS: reload without a restart --------------------------------------------------------

def test_server_tls_without_files_is_unavailable(tmp_path):
    tls = ServerTLS(str(tmp_path / "no.pem"), str(tmp_path / "no.key"), Clock())
    assert not tls.available
    assert tls.getContext() is None


def test_server_tls_with_broken_files_at_start_raises(tmp_path):
    cert, key = make_pair(str(tmp_path))
    with open(cert, "wb") as f:
        f.write(b"junk")
    with pytest.raises(TLSError):
        ServerTLS(cert, key, Clock())


def test_a_rewritten_pair_is_used_after_the_check_interval(pair):
    cert, key = pair
    clock = Clock()
    tls = ServerTLS(cert, key, clock)
    assert tls.available
    first = tls.getContext()
    assert context_serial(first) == read_cert(cert).serial_number
    assert tls.getContext() is first

    make_pair(os.path.dirname(cert))
    new_serial = read_cert(cert).serial_number
    clock.advance(0.5)                       # the files are looked at once a second at most
    assert tls.getContext() is first
    clock.advance(0.6)
    second = tls.getContext()
    assert second is not first
    assert context_serial(second) == new_serial
    # a new handshake with the new context works
    assert handshake(second, client_context(V.TLSv1_2, V.TLSv1_3))[1] == "TLSv1.3"
    clock.advance(5)
    assert tls.getContext() is second        # unchanged files: no reload


def test_a_broken_rewrite_keeps_the_old_certificate(pair, logged):
    cert, key = pair
    clock = Clock()
    tls = ServerTLS(cert, key, clock)
    good = tls.getContext()
    serial = context_serial(good)

    with open(cert + ".new", "wb") as f:
        f.write(b"-----BEGIN CERTIFICATE-----\ntruncated\n")
    os.replace(cert + ".new", cert)
    clock.advance(1.1)
    assert tls.getContext() is good
    assert context_serial(tls.getContext()) == serial
    assert any("TLS reload failed, keeping the previous certificate" in t for t in log_texts(logged))
    clock.advance(1.1)
    assert tls.getContext() is good

    # then a good renewal is picked up again
    make_pair(os.path.dirname(cert))
    clock.advance(1.1)
    renewed = tls.getContext()
    assert renewed is not good and context_serial(renewed) == read_cert(cert).serial_number


def test_a_half_done_renewal_keeps_the_old_pair_until_both_files_match(tmp_path):
    cert, key = make_pair(str(tmp_path / "live"))
    clock = Clock()
    tls = ServerTLS(cert, key, clock)
    good = tls.getContext()
    new_cert, new_key = make_pair(str(tmp_path / "next"))
    os.replace(new_cert, cert)             # certificate renewed, key not yet
    clock.advance(1.1)
    assert tls.getContext() is good
    os.replace(new_key, key)               # now the key follows
    clock.advance(1.1)
    renewed = tls.getContext()
    assert renewed is not good
    assert context_serial(renewed) == read_cert(cert).serial_number


def test_vanished_files_keep_the_loaded_certificate(pair, logged):
    cert, key = pair
    clock = Clock()
    tls = ServerTLS(cert, key, clock)
    good = tls.getContext()
    os.unlink(key)
    clock.advance(1.1)
    assert tls.getContext() is good and tls.available
    assert any("vanished" in t for t in log_texts(logged))


def test_lets_encrypt_style_symlinks_switching_to_a_new_pair(tmp_path):
    """certbot keeps archive/NAME/certN.pem and points live/NAME/*.pem at the newest."""
    archive, live = tmp_path / "archive", tmp_path / "live"
    live.mkdir()
    make_pair(str(archive), name="fullchain1.pem", key_name="privkey1.pem")
    for name in ("fullchain", "privkey"):
        os.symlink(archive / f"{name}1.pem", live / f"{name}.pem")
    clock = Clock()
    tls = ServerTLS(str(live / "fullchain.pem"), str(live / "privkey.pem"), clock)
    first = tls.getContext()
    assert context_serial(first) == read_cert(archive / "fullchain1.pem").serial_number

    make_pair(str(archive), name="fullchain2.pem", key_name="privkey2.pem")
    for name in ("fullchain", "privkey"):
        os.symlink(archive / f"{name}2.pem", live / f"{name}.pem.new")
        os.replace(live / f"{name}.pem.new", live / f"{name}.pem")
    clock.advance(1.0)
    second = tls.getContext()
    assert second is not first
    assert context_serial(second) == read_cert(archive / "fullchain2.pem").serial_number


def test_reload_logs_the_new_certificate(pair, logged):
    cert, key = pair
    clock = Clock()
    tls = ServerTLS(cert, key, clock)
    tls.getContext()
    make_pair(os.path.dirname(cert))
    clock.advance(1)
    tls.getContext()
    assert any(t == f"TLS certificate reloaded from {cert}" for t in log_texts(logged))


# -- mailsys tls self-signed ------------------------------------------------------------------

def write_config(tmp_path, hostname="mail.cli.test"):
    path = tmp_path / "mailsys.toml"
    path.write_text(f'[server]\nhostname = "{hostname}"\nstate_dir = "state"\n\n'
                    '[tls]\ncertificate = "tls/fullchain.pem"\nkey = "tls/privkey.pem"\n')
    return path


def test_cli_self_signed_writes_where_tls_points(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli.main(["tls", "self-signed", "--config", str(config)]) == 0
    cert_path, key_path = tmp_path / "tls" / "fullchain.pem", tmp_path / "tls" / "privkey.pem"
    out = capsys.readouterr().out
    assert out == f"wrote {cert_path} and {key_path} for mail.cli.test\n"
    cert = read_cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.cli.test"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    load_context(str(cert_path), str(key_path))


def test_cli_self_signed_refuses_to_overwrite_without_force(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli.main(["tls", "self-signed", "--config", str(config)]) == 0
    serial = read_cert(tmp_path / "tls" / "fullchain.pem").serial_number
    capsys.readouterr()
    assert cli.main(["tls", "self-signed", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailsys: ") and "--force" in err
    assert read_cert(tmp_path / "tls" / "fullchain.pem").serial_number == serial
    assert cli.main(["tls", "self-signed", "--config", str(config), "--force",
                     "--hostname", "other.example"]) == 0
    cert = read_cert(tmp_path / "tls" / "fullchain.pem")
    assert cert.serial_number != serial
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "other.example"


def test_cli_self_signed_writes_both_files_or_neither(tmp_path, capsys):
    """A certificate directory that cannot be made must not leave a new key next
    to the old certificate (or a traceback)."""
    config = write_config(tmp_path)
    assert cli.main(["tls", "self-signed", "--config", str(config)]) == 0
    key_path = tmp_path / "tls" / "privkey.pem"
    old_key = key_path.read_bytes()
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(f'[server]\nhostname = "mail.cli.test"\n[tls]\n'
                         f'certificate = "/proc/x/cert.pem"\nkey = "{key_path}"\n')
    assert cli.main(["tls", "self-signed", "--config", str(elsewhere), "--force"]) == 1
    assert capsys.readouterr() == ("", "mailsys: cannot write /proc/x (No such file or "
                                   "directory), so neither the certificate nor the key was "
                                   "written; create that directory or point [tls] somewhere "
                                   "writable\n")
    assert key_path.read_bytes() == old_key
    assert sorted(os.listdir(tmp_path / "tls")) == ["fullchain.pem", "privkey.pem"]

    # A key directory to make next to a certificate path that is a directory:
    # refused before anything is made.
    (tmp_path / "certdir").mkdir()
    blocked = tmp_path / "blocked.toml"
    blocked.write_text(f'[server]\nhostname = "mail.cli.test"\n[tls]\n'
                       f'certificate = "{tmp_path}/certdir"\nkey = "{tmp_path}/new/key.pem"\n')
    assert cli.main(["tls", "self-signed", "--config", str(blocked), "--force"]) == 1
    assert capsys.readouterr().err == (f"mailsys: cannot write {tmp_path}/certdir (Is a "
                                       "directory), so neither the certificate nor the key was "
                                       "written; create that directory or point [tls] somewhere "
                                       "writable\n")
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "certdir") == []


@pytest.mark.parametrize("hostname", ["bad host!", "x-.example", "a..b", ""])
def test_cli_self_signed_refuses_a_bad_hostname(tmp_path, capsys, hostname):
    config = write_config(tmp_path)
    assert cli.main(["tls", "self-signed", "--config", str(config), "--hostname", hostname]) == 2
    assert capsys.readouterr() == ("", f"mailsys: {hostname!r} is not a host name; pass "
                                   "--hostname a name such as mail.example.com (letters, "
                                   "digits, hyphens and dots)\n")
    assert not (tmp_path / "tls").exists()
