"""SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) for SMTP AUTH.

Pure decoders: text in, a step result out.  Every malformed input becomes a
:class:`SaslError` carrying the reply to send (RFC 4954 section 4), so nothing
a client sends can raise anything else into the protocol.
"""
import binascii

from mailsys.smtp.reply import Reply

MAX_CREDENTIAL = 1024   # bytes of a user name or password after decoding

CANCELLED = Reply(501, "5.7.0", "Authentication aborted")
UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
BAD_SYNTAX = Reply(501, "5.5.2", "Invalid authentication exchange syntax")
AUTHZ_MISMATCH = Reply(535, "5.7.8", "Authentication credentials invalid")
TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")


class SaslError(Exception):
    """``user``: the authentication identity when the exchange itself was well
    formed but cannot be allowed (PLAIN naming another authorization identity):
    a failed login of that user, to be logged and throttled as one."""

    def __init__(self, reply, user=None):
        super().__init__(str(reply))
        self.reply = reply
        self.user = user


def decode_response(text):
    """Base64 response line (or '=' for empty) to bytes; '*' cancels."""
    text = text.strip()
    if text == "*":
        raise SaslError(CANCELLED)
    if text == "=":
        return b""
    if not text or len(text) % 4:
        raise SaslError(UNDECODABLE)
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SaslError(UNDECODABLE)


def _text(raw):
    if not raw or len(raw) > MAX_CREDENTIAL or b"\x00" in raw:
        raise SaslError(BAD_SYNTAX)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(BAD_SYNTAX)


def decode_plain(raw):
    """``authzid NUL authcid NUL passwd`` -> (authcid, password).

    The authorisation identity must be empty or the same as the authentication
    identity: mailsys has no proxy authorisation.
    """
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        raise SaslError(BAD_SYNTAX)
    authzid, authcid, passwd = parts
    user, password = _text(authcid), _text(passwd)
    if authzid and authzid != authcid:
        raise SaslError(AUTHZ_MISMATCH, user=user)
    return user, password


class Plain:
    name = "PLAIN"

    def __init__(self):
        self.result = None

    def start(self, initial):
        """Returns the challenge to send (str, base64) or None when done."""
        if initial is None:
            return ""
        self.result = decode_plain(decode_response(initial))
        return None

    def step(self, line):
        self.result = decode_plain(decode_response(line))
        return None


class Login:
    name = "LOGIN"
    USERNAME = "VXNlcm5hbWU6"   # "Username:"
    PASSWORD = "UGFzc3dvcmQ6"   # "Password:"

    def __init__(self):
        self.user = None
        self.result = None

    def start(self, initial):
        if initial is None:
            return self.USERNAME
        self.user = _text(decode_response(initial))
        return self.PASSWORD

    def step(self, line):
        raw = decode_response(line)
        if self.user is None:
            self.user = _text(raw)
            return self.PASSWORD
        self.result = (self.user, _text(raw))
        return None


MECHANISMS = {"PLAIN": Plain, "LOGIN": Login}
