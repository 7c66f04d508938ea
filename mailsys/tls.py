"""TLS for the listeners: contexts from PEM files, reloaded when they change.

One :class:`ServerTLS` per mail host serves STARTTLS (mta, submission, pop3)
and the implicit-TLS roles (submissions, pop3s).  ``getContext()`` is asked for
every new TLS session, so a renewed certificate (Let's Encrypt rewriting the
files in place, or a symlink switched to a new pair) is used from the next
connection on, without a restart; the files are looked at no more than once a
second.  A broken renewal keeps the last good pair and logs why.
"""
import datetime
import ipaddress
import os

from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from mailsys.files import write_together

log = Logger(namespace="mailsys.tls")

# Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are OpenSSL's defaults.
CIPHERS = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
           "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
           "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")


class TLSError(Exception):
    """The certificate or key cannot be used; ``which`` says which file is at fault
    ("certificate" or "key", the [tls] key to point at)."""

    def __init__(self, message, which="certificate"):
        super().__init__(message)
        self.which = which


def _stamp(path):
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_context(certificate, key):
    """An OpenSSL server context: TLS 1.2 minimum, forward-secret AEAD ciphers,
    our preference order, no compression or renegotiation, the full chain sent."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import SSL

    pems = {}
    for which, path in (("certificate", certificate), ("key", key)):
        try:
            with open(path, "rb") as f:
                pems[which] = f.read()
        except OSError as e:
            raise TLSError(f"cannot read {path}: {e.strerror}", which)
    try:
        chain = x509.load_pem_x509_certificates(pems["certificate"])
    except ValueError:
        raise TLSError(f"{certificate} holds no PEM certificate")
    try:
        private = load_pem_private_key(pems["key"], password=None)
    except (ValueError, TypeError):
        raise TLSError(f"{key} holds no unencrypted PEM private key", "key")
    try:
        matches = chain[0].public_key() == private.public_key()
    except Exception:   # a key cryptography cannot compare: OpenSSL's check below decides
        matches = True
    if not matches:
        raise TLSError(f"{key} is not the private key of the certificate in {certificate}", "key")
    try:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.set_cipher_list(CIPHERS.encode("ascii"))
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(private)
        ctx.check_privatekey()
        return ctx
    except Exception as e:  # OpenSSL and cryptography report problems with many types
        raise TLSError(f"{certificate}/{key}: not a usable certificate and key: {e}")


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """Context factory (IOpenSSLContextFactory-style) that follows the PEM files."""

    def __init__(self, certificate, key, clock, check_interval=1.0):
        self.certificate, self.key = certificate, key
        self.clock = clock
        self.check_interval = check_interval
        self._context = None
        self._stamp = None
        self._next_check = 0.0
        self.reload()

    @property
    def available(self):
        return self._context is not None

    def reload(self):
        try:
            stamp = (_stamp(self.certificate), _stamp(self.key))
        except OSError:
            if self._context is None:
                return
            log.warn("TLS files {certificate} or {key} vanished; keeping the loaded certificate",
                     certificate=self.certificate, key=self.key)
            return
        if stamp == self._stamp:
            return
        try:
            ctx = load_context(self.certificate, self.key)
        except TLSError as e:
            if self._context is None:
                raise
            log.error("TLS reload failed, keeping the previous certificate: {error}", error=str(e))
            self._stamp = stamp
            return
        if self._context is not None:
            log.info("TLS certificate reloaded from {certificate}", certificate=self.certificate)
        self._context, self._stamp = ctx, stamp

    def getContext(self):
        now = self.clock.seconds()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self.reload()
        return self._context


def write_self_signed(hostname, certificate, key, days=825):
    """Create a self-signed certificate for ``hostname`` (key mode 0600, written atomically)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    sans = [x509.DNSName(hostname)]
    if hostname != "localhost":
        sans.append(x509.DNSName("localhost"))
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private, hashes.SHA256()))
    key_pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # Both or neither: a new key next to the old certificate (or the reverse)
    # is a pair the server refuses.
    write_together([(key, key_pem, 0o600), (certificate, cert_pem, 0o644)])


def cli_self_signed(args):
    """``mailsys tls self-signed [--hostname H]``."""
    from mailsys.cli import EXIT_USAGE, CommandError, load_config
    from mailsys.config import is_hostname

    config = load_config(args)
    hostname = config.server.hostname if args.hostname is None else args.hostname
    if not is_hostname(hostname):
        raise CommandError(f"{hostname!r} is not a host name; pass --hostname a name such as "
                           "mail.example.com (letters, digits, hyphens and dots)", EXIT_USAGE)
    if os.path.exists(config.tls.certificate) and not args.force:
        raise CommandError(f"{config.tls.certificate} exists; pass --force to replace it")
    try:
        write_self_signed(hostname, config.tls.certificate, config.tls.key)
    except OSError as e:
        where = e.filename or os.path.dirname(config.tls.certificate)
        raise CommandError(f"cannot write {where} ({e.strerror}), so neither the certificate "
                           "nor the key was written; create that directory or point [tls] "
                           "somewhere writable") from None
    print(f"wrote {config.tls.certificate} and {config.tls.key} for {hostname}")
    return 0
