"""STARTTLS (RFC 3207) and AUTH (RFC 4954, PLAIN RFC 4616, LOGIN) in
mailsys.smtp.server.SMTPServerProtocol, on a StringTransport that records
``startTLS`` and a task.Clock.

Every expectation is the exact bytes on the wire.  The transport notes how much
output had been written when ``startTLS`` was called, so a test can tell the
clear-text part of a session from the part "inside TLS" (after the call, the fake
transport simply hands over what would be the decrypted bytes).
"""
import base64

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from tests.helpers import FakeHandler, feed, feed_bytewise, limits, take

HOST = "mx.example.com"
BANNER = b"220 mx.example.com ESMTP\r\n"


def ehlo_reply(*, starttls=False, auth=False):
    keywords = [HOST, "PIPELINING", "SIZE 10485760"]
    if starttls:
        keywords.append("STARTTLS")
    if auth:
        keywords.append("AUTH PLAIN LOGIN")
    keywords += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "DSN", "HELP"]
    return "".join(f"250{' ' if i == len(keywords) - 1 else '-'}{k}\r\n"
                   for i, k in enumerate(keywords)).encode()


EHLO_CLEAR = ehlo_reply(starttls=True)            # submission/mta with a certificate, before TLS
EHLO_TLS_AUTH = ehlo_reply(auth=True)             # submission inside TLS, not yet authenticated
EHLO_PLAIN = ehlo_reply()                         # no certificate; or mta inside TLS; or after AUTH

READY = b"220 2.0.0 Ready to start TLS\r\n"
TLS_ACTIVE = b"554 5.5.1 Error: TLS already active\r\n"
STARTTLS_SYNTAX = b"501 5.5.4 Syntax: STARTTLS\r\n"
NOT_IMPLEMENTED = b"502 5.5.1 Error: command not implemented\r\n"
NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
NEED_EHLO = b"503 5.5.1 Error: send EHLO first\r\n"     # AUTH after HELO: not offered there
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
ENCRYPTION_REQUIRED = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
AUTH_NOT_ENABLED = b"503 5.5.1 Error: authentication not enabled\r\n"
ALREADY_AUTHENTICATED = b"503 5.5.1 Error: already authenticated\r\n"
IN_TRANSACTION = b"503 5.5.1 Error: MAIL transaction in progress\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
CANCELLED = b"501 5.7.0 Authentication aborted\r\n"
UNDECODABLE = b"501 5.5.2 Cannot decode response\r\n"
BAD_SYNTAX = b"501 5.5.2 Invalid authentication exchange syntax\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
RESPONSE_TOO_LONG = b"500 5.5.6 Authentication exchange line is too long\r\n"
TOO_MANY_FAILURES = b"421 4.7.0 mx.example.com Error: too many failed authentications\r\n"
UNRECOGNIZED = b"504 5.5.4 Unrecognized authentication type\r\n"
AUTH_SYNTAX = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
OK = b"250 2.0.0 Ok\r\n"
BYE = b"221 2.0.0 Bye\r\n"
CHALLENGE_EMPTY = b"334 \r\n"
USERNAME = b"334 VXNlcm5hbWU6\r\n"
PASSWORD = b"334 UGFzc3dvcmQ6\r\n"

USER = "alice@example.com"
SECRET = "correct horse battery staple"


def b64(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


PLAIN_OK = b64(f"\0{USER}\0{SECRET}")
PLAIN_BAD = b64(f"\0{USER}\0wrong password")


class TLSTransport(StringTransportWithDisconnection):
    """A StringTransport with ``startTLS``: records each call with the number of
    output bytes written before it (the clear-text part of the session)."""

    def __init__(self):
        super().__init__()
        self.tls_starts = []
        self.TLS = False

    def startTLS(self, context, normal=True):
        self.tls_starts.append((context, len(self.value())))
        self.TLS = True


class AuthHandler(FakeHandler):
    """FakeHandler plus the two methods the submission roles need."""

    CONTEXT = object()

    def __init__(self, users=None):
        super().__init__()
        self.users = dict(users if users is not None else {USER: SECRET})
        self.answers["authenticate"] = self._check

    def _check(self, user, password):
        if password is not None and self.users.get(user) == password:
            return user
        return Reply(535, "5.7.8", "Authentication credentials invalid")

    def tls_context(self, proto):
        self.calls.append(("tls_context",))
        return self.CONTEXT

    def authenticate(self, proto, user, password):
        self.calls.append(("authenticate", user, password))
        return self._result("authenticate", user, password)


def connect(*, tls_available=True, mechanisms=("PLAIN", "LOGIN"), implicit_tls=False,
            handler=None, **limit_overrides):
    handler = handler if handler is not None else AuthHandler()
    clock = Clock()
    proto = SMTPServerProtocol(handler, HOST, limits=limits(**limit_overrides), clock=clock,
                               tls_available=tls_available, auth_mechanisms=mechanisms)
    if implicit_tls:
        proto.tls = True          # what mailsys.receive does for the submissions role
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    assert take(t) == BANNER
    return proto, t, handler, clock


def send(proto, t, data):
    proto.dataReceived(data)
    return take(t)


def tls_session(**kw):
    """A submission session inside TLS (implicit, as on the submissions port), after EHLO."""
    proto, t, h, clock = connect(implicit_tls=True, tls_available=False, **kw)
    assert send(proto, t, b"EHLO client.example\r\n") == EHLO_TLS_AUTH
    return proto, t, h, clock


def starttls_session(**kw):
    """A submission session after EHLO, STARTTLS and a second EHLO."""
    proto, t, h, clock = connect(**kw)
    assert send(proto, t, b"EHLO client.example\r\nSTARTTLS\r\n") == EHLO_CLEAR + READY
    assert send(proto, t, b"EHLO client.example\r\n") == EHLO_TLS_AUTH
    return proto, t, h, clock


def authenticated(**kw):
    proto, t, h, clock = tls_session(**kw)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK
    return proto, t, h, clock


def auth_calls(h):
    return [c for c in h.calls if c[0] == "authenticate"]


# -- STARTTLS -------------------------------------------------------------------------

@pytest.mark.parametrize("tls_available,in_tls,offered", [
    (True, False, True), (False, False, False), (True, True, False), (False, True, False)])
def test_starttls_offered_only_with_a_certificate_and_outside_tls(tls_available, in_tls, offered):
    proto, t, h, clock = connect(tls_available=tls_available, implicit_tls=in_tls, mechanisms=())
    out = send(proto, t, b"EHLO client.example\r\n")
    assert out == ehlo_reply(starttls=offered)
    help_text = send(proto, t, b"HELP\r\n")
    assert (b" STARTTLS " in help_text) is offered


def test_starttls_without_a_certificate_is_not_implemented():
    proto, t, h, clock = connect(tls_available=False, mechanisms=())
    assert send(proto, t, b"EHLO c.example\r\nSTARTTLS\r\n") == EHLO_PLAIN + NOT_IMPLEMENTED
    assert t.tls_starts == []
    assert send(proto, t, b"NOOP\r\n") == OK


@pytest.mark.parametrize("line", [b"STARTTLS now", b"STARTTLS x y", b"starttls  =", b"STARTTLS \t."])
def test_starttls_with_arguments_is_a_syntax_error(line):
    proto, t, h, clock = connect()
    assert send(proto, t, b"EHLO c.example\r\n" + line + b"\r\n") == EHLO_CLEAR + STARTTLS_SYNTAX
    assert t.tls_starts == [] and proto.tls is False
    # still in the clear, still the same session
    assert send(proto, t, b"MAIL FROM:<a@b.example>\r\n") == SENDER_OK


def test_starttls_before_ehlo_needs_ehlo():
    proto, t, h, clock = connect()
    assert send(proto, t, b"STARTTLS\r\n") == NEED_HELO
    assert t.tls_starts == []


def test_starttls_inside_implicit_tls_is_refused():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"STARTTLS\r\n") == TLS_ACTIVE
    assert t.tls_starts == []
    assert send(proto, t, b"NOOP\r\n") == OK


def test_starttls_twice_is_refused():
    proto, t, h, clock = starttls_session()
    assert send(proto, t, b"STARTTLS\r\n") == TLS_ACTIVE
    assert len(t.tls_starts) == 1


def test_starttls_replies_220_in_the_clear_then_switches():
    proto, t, h, clock = connect()
    proto.dataReceived(b"EHLO client.example\r\nSTARTTLS\r\n")
    out = t.value()
    assert out == EHLO_CLEAR + READY
    # startTLS was called exactly once, with the handler's context, after the 220
    # had been written (the 220 must travel in the clear).
    assert t.tls_starts == [(AuthHandler.CONTEXT, len(out))]
    assert proto.tls is True
    assert ("tls_context",) in h.calls


def test_after_starttls_a_new_ehlo_is_required():
    proto, t, h, clock = connect()
    assert send(proto, t, b"EHLO client.example\r\nSTARTTLS\r\n") == EHLO_CLEAR + READY
    assert send(proto, t, b"MAIL FROM:<a@b.example>\r\n") == NEED_HELO
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == NEED_HELO
    assert ("mail", "a@b.example", {}) not in h.calls
    assert send(proto, t, b"EHLO client.example\r\n") == EHLO_TLS_AUTH
    assert send(proto, t, b"MAIL FROM:<a@b.example>\r\n") == SENDER_OK


def test_helo_after_starttls_is_enough_for_mail_but_not_for_auth():
    proto, t, h, clock = connect()
    assert send(proto, t, b"EHLO client.example\r\nSTARTTLS\r\n") == EHLO_CLEAR + READY
    assert send(proto, t, b"HELO client.example\r\n") == b"250 mx.example.com\r\n"
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == NEED_EHLO


def test_starttls_forgets_the_open_transaction():
    proto, t, h, clock = connect()
    out = send(proto, t, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n"
                         b"STARTTLS\r\n")
    assert out == EHLO_CLEAR + SENDER_OK + RCPT_OK + READY
    assert ("data_abort", None) in h.calls
    assert send(proto, t, b"EHLO c.example\r\nRCPT TO:<x@y.example>\r\nDATA\r\n") == (
        EHLO_TLS_AUTH + NEED_MAIL + NEED_MAIL)


def test_mta_role_inside_tls_offers_no_auth():
    proto, t, h, clock = connect(mechanisms=())
    assert send(proto, t, b"EHLO c.example\r\nSTARTTLS\r\n") == EHLO_CLEAR + READY
    assert send(proto, t, b"EHLO c.example\r\n") == EHLO_PLAIN


# -- AUTH: when it is allowed -----------------------------------------------------------

def test_auth_is_not_advertised_before_tls():
    proto, t, h, clock = connect()
    assert b"AUTH" not in send(proto, t, b"EHLO c.example\r\n")


@pytest.mark.parametrize("line", [b"AUTH PLAIN " + PLAIN_OK, b"AUTH PLAIN", b"AUTH LOGIN",
                                  b"AUTH CRAM-MD5"])
def test_auth_before_tls_needs_encryption(line):
    proto, t, h, clock = connect()
    assert send(proto, t, b"EHLO c.example\r\n" + line + b"\r\nNOOP\r\n") == (
        EHLO_CLEAR + ENCRYPTION_REQUIRED + OK)
    assert auth_calls(h) == [] and proto.auth_user is None


@pytest.mark.parametrize("in_tls", [False, True])
def test_auth_on_the_mta_role_is_not_enabled(in_tls):
    proto, t, h, clock = connect(mechanisms=(), implicit_tls=in_tls)
    assert send(proto, t, b"EHLO c.example\r\n") == ehlo_reply(starttls=not in_tls)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_NOT_ENABLED
    assert auth_calls(h) == [] and proto.auth_user is None


def test_auth_before_ehlo():
    proto, t, h, clock = connect(implicit_tls=True)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == NEED_HELO
    assert send(proto, t, b"HELO c.example\r\n") == b"250 mx.example.com\r\n"
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == NEED_EHLO
    assert auth_calls(h) == []


@pytest.mark.parametrize("line,reply", [
    (b"AUTH", AUTH_SYNTAX), (b"AUTH ", AUTH_SYNTAX), (b"AUTH PLAIN a b", AUTH_SYNTAX),
    (b"AUTH CRAM-MD5", UNRECOGNIZED), (b"AUTH XOAUTH2 abcd", UNRECOGNIZED),
    (b"AUTH EXTERNAL =", UNRECOGNIZED)])
def test_auth_command_syntax(line, reply):
    proto, t, h, clock = tls_session()
    assert send(proto, t, line + b"\r\n") == reply
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK


# -- AUTH PLAIN and LOGIN ---------------------------------------------------------------

def test_plain_with_initial_response():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK
    assert auth_calls(h) == [("authenticate", USER, SECRET)]
    assert proto.auth_user == USER
    # AUTH is no longer advertised, and the session goes on
    assert send(proto, t, b"EHLO c.example\r\n") == EHLO_PLAIN
    assert send(proto, t, b"MAIL FROM:<alice@example.com>\r\n") == SENDER_OK


def test_plain_mechanism_name_is_case_insensitive():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"auth plain " + PLAIN_OK + b"\r\n") == AUTH_OK


def test_plain_after_a_334_challenge():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH PLAIN\r\n") == CHALLENGE_EMPTY
    assert auth_calls(h) == []
    assert send(proto, t, PLAIN_OK + b"\r\n") == AUTH_OK
    assert auth_calls(h) == [("authenticate", USER, SECRET)]


def test_plain_with_authzid_equal_to_authcid():
    proto, t, h, clock = tls_session()
    line = b"AUTH PLAIN " + b64(f"{USER}\0{USER}\0{SECRET}") + b"\r\n"
    assert send(proto, t, line) == AUTH_OK


@pytest.mark.parametrize("initial", [True, False])
def test_plain_authzid_other_than_authcid_is_refused(initial):
    proto, t, h, clock = tls_session()
    token = b64(f"bob@example.com\0{USER}\0{SECRET}")
    if initial:
        out = send(proto, t, b"AUTH PLAIN " + token + b"\r\n")
    else:
        assert send(proto, t, b"AUTH PLAIN\r\n") == CHALLENGE_EMPTY
        out = send(proto, t, token + b"\r\n")
    assert out == INVALID
    # To the handler as a failed login of the user, with no password: it logs
    # and throttles it like wrong credentials.
    assert auth_calls(h) == [("authenticate", USER, None)] and proto.auth_user is None
    # it counts as a failed attempt, and the session survives
    assert proto.auth_failures == 1
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK


def test_mail_takes_the_auth_parameter_where_auth_is_offered():
    """RFC 4954 5 (a satellite MTA relaying through us sends AUTH=<>); on a
    connection without the AUTH extension it stays an unknown parameter."""
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"MAIL FROM:<a@b.example> AUTH=<>\r\n") == SENDER_OK
    assert send(proto, t, b"RSET\r\n") == OK
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK
    assert send(proto, t, b"MAIL FROM:<a@b.example> AUTH=a+40b.example\r\n") == SENDER_OK
    proto, t, h, clock = connect()
    assert send(proto, t, b"EHLO client.example\r\n").startswith(b"250-")
    assert send(proto, t, b"MAIL FROM:<a@b.example> AUTH=<>\r\n") == \
        b"555 5.5.4 Unsupported option: AUTH\r\n"


def test_login_with_prompts():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH LOGIN\r\n") == USERNAME
    assert send(proto, t, b64(USER) + b"\r\n") == PASSWORD
    assert auth_calls(h) == []
    assert send(proto, t, b64(SECRET) + b"\r\n") == AUTH_OK
    assert auth_calls(h) == [("authenticate", USER, SECRET)]
    assert proto.auth_user == USER


def test_login_with_initial_response():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH LOGIN " + b64(USER) + b"\r\n") == PASSWORD
    assert send(proto, t, b64(SECRET) + b"\r\n") == AUTH_OK
    assert auth_calls(h) == [("authenticate", USER, SECRET)]


def test_auth_after_starttls():
    proto, t, h, clock = starttls_session()
    assert send(proto, t, b"AUTH LOGIN\r\n") == USERNAME
    assert send(proto, t, b64(USER) + b"\r\n" + b64(SECRET) + b"\r\n") == PASSWORD + AUTH_OK


def test_wrong_password():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_BAD + b"\r\n") == INVALID
    assert proto.auth_user is None and proto.auth_failures == 1
    assert send(proto, t, b"MAIL FROM:<a@b.example>\r\nRSET\r\n") == SENDER_OK + OK


# -- AUTH: cancel and malformed responses (each 501, the session survives) ------------------

@pytest.mark.parametrize("start,prompts", [
    (b"AUTH PLAIN\r\n", CHALLENGE_EMPTY),
    (b"AUTH LOGIN\r\n", USERNAME),
    (b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n", USERNAME + PASSWORD),
    (b"AUTH LOGIN " + b64(USER) + b"\r\n", PASSWORD),
], ids=["plain", "login-username", "login-password", "login-initial"])
def test_star_cancels(start, prompts):
    proto, t, h, clock = tls_session()
    assert send(proto, t, start) == prompts
    assert send(proto, t, b"*\r\n") == CANCELLED
    assert auth_calls(h) == [] and proto.auth_failures == 0
    # the "*" line was the end of the exchange: the next line is a command again
    assert send(proto, t, b"NOOP\r\n") == OK
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK


@pytest.mark.parametrize("response", [
    b"abc", b"abcde", b"ab=c", b"====", b"!!!!", b"YWJj*", b"YW Jj", b"YWJj\x00", b"-_-_",
    b"YQ==YQ==", b"\xc3\xa9\xc3\xa9", b"\xff\xfe\xfd\xfc", b"AAAA\x80",
], ids=repr)
@pytest.mark.parametrize("mech", [b"PLAIN", b"LOGIN"])
def test_malformed_base64_in_a_response(mech, response):
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH " + mech + b"\r\n") in (CHALLENGE_EMPTY, USERNAME)
    assert send(proto, t, response + b"\r\n") == UNDECODABLE
    assert auth_calls(h) == [] and proto.auth_failures == 0
    assert send(proto, t, b"NOOP\r\n") == OK


@pytest.mark.parametrize("initial", [b"abc", b"ab=c", b"!!!!", b"YWJj*", b"A===", b"-_-_"])
@pytest.mark.parametrize("mech", [b"PLAIN", b"LOGIN"])
def test_malformed_base64_in_an_initial_response(mech, initial):
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH " + mech + b" " + initial + b"\r\n") == UNDECODABLE
    assert auth_calls(h) == []
    assert send(proto, t, b"NOOP\r\n") == OK


@pytest.mark.parametrize("decoded", [
    b"", b"no nul at all", b"\0only-one-nul", b"a\0b\0c\0d", b"\0\0\0\0", b"\0\0secret",
    b"\0alice@example.com\0", b"\0al\xffice\0secret", b"\0alice\0se\xc3cret",
], ids=repr)
def test_plain_structure_errors(decoded):
    proto, t, h, clock = tls_session()
    token = b64(decoded) if decoded else b"="
    assert send(proto, t, b"AUTH PLAIN " + token + b"\r\n") == BAD_SYNTAX
    assert auth_calls(h) == [] and proto.auth_failures == 0
    assert send(proto, t, b"NOOP\r\n") == OK


@pytest.mark.parametrize("decoded", [b"", b"nul\0inside", b"\xff\xfe", b"x" * 1025])
def test_login_structure_errors(decoded):
    proto, t, h, clock = tls_session()
    token = b64(decoded) if decoded else b"="
    assert send(proto, t, b"AUTH LOGIN\r\n") == USERNAME
    assert send(proto, t, token + b"\r\n") == BAD_SYNTAX
    assert send(proto, t, b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n") == USERNAME + PASSWORD
    assert send(proto, t, token + b"\r\n") == BAD_SYNTAX
    assert auth_calls(h) == []
    assert send(proto, t, b"NOOP\r\n") == OK


@pytest.mark.parametrize("pieces", [1, 3, 40])
def test_over_long_response_line(pieces):
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH PLAIN\r\n") == CHALLENGE_EMPTY
    line = b"QUFB" * 2000 + b"\r\n"     # 8002 bytes
    step = -(-len(line) // pieces)
    out = b""
    for i in range(0, len(line), step):
        out += send(proto, t, line[i:i + step])
    assert out == RESPONSE_TOO_LONG
    assert auth_calls(h) == [] and proto.auth_user is None
    # the exchange is over; the session survives and can authenticate
    assert send(proto, t, b"NOOP\r\n") == OK
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK


def test_over_long_login_password_line():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"AUTH LOGIN " + b64(USER) + b"\r\n") == PASSWORD
    assert send(proto, t, b"A" * 4096 + b"\r\nNOOP\r\n") == RESPONSE_TOO_LONG + OK
    assert auth_calls(h) == []


# -- AUTH: sequence -----------------------------------------------------------------------

def test_auth_twice():
    proto, t, h, clock = authenticated()
    for line in (b"AUTH PLAIN " + PLAIN_OK, b"AUTH LOGIN", b"AUTH PLAIN"):
        assert send(proto, t, line + b"\r\n") == ALREADY_AUTHENTICATED
    assert len(auth_calls(h)) == 1
    assert send(proto, t, b"NOOP\r\n") == OK


def test_auth_inside_a_transaction():
    proto, t, h, clock = tls_session()
    assert send(proto, t, b"MAIL FROM:<a@b.example>\r\n") == SENDER_OK
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == IN_TRANSACTION
    assert auth_calls(h) == [] and proto.auth_user is None
    # the transaction is intact
    assert send(proto, t, b"RCPT TO:<x@y.example>\r\n") == RCPT_OK
    assert send(proto, t, b"RSET\r\nAUTH PLAIN " + PLAIN_OK + b"\r\n") == OK + AUTH_OK


def test_success_is_235_and_mail_follows():
    proto, t, h, clock = tls_session()
    out = send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\nMAIL FROM:<alice@example.com>\r\n")
    assert out == AUTH_OK + SENDER_OK


# -- AUTH: failure limit ------------------------------------------------------------------

@pytest.mark.parametrize("allowed", [1, 2, 3, 5])
def test_failures_per_connection_then_421_and_close(allowed):
    proto, t, h, clock = tls_session(auth_failures=allowed)
    for _ in range(allowed - 1):
        assert send(proto, t, b"AUTH PLAIN " + PLAIN_BAD + b"\r\n") == INVALID
        assert t.connected
    # the last allowed failure: its 535, then 421 and close; a pipelined command
    # after it is never answered
    out = send(proto, t, b"AUTH PLAIN " + PLAIN_BAD + b"\r\nNOOP\r\n")
    assert out == INVALID + TOO_MANY_FAILURES
    assert not t.connected and h.calls[-1] == ("disconnected",)
    assert len(auth_calls(h)) == allowed


def test_failures_of_every_kind_count_and_a_success_in_between_does_not_reset():
    # authzid mismatch (decoder) and wrong password (checker) both count
    proto, t, h, clock = tls_session(auth_failures=3)
    mismatch = b64(f"bob@example.com\0{USER}\0{SECRET}")
    assert send(proto, t, b"AUTH PLAIN " + mismatch + b"\r\n") == INVALID
    assert send(proto, t, b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64("nope") + b"\r\n") == (
        USERNAME + PASSWORD + INVALID)
    assert t.connected
    assert send(proto, t, b"AUTH PLAIN\r\n" + PLAIN_BAD + b"\r\n") == (
        CHALLENGE_EMPTY + INVALID + TOO_MANY_FAILURES)
    assert not t.connected


def test_cancel_and_syntax_errors_do_not_count_as_failed_authentications():
    proto, t, h, clock = tls_session(auth_failures=2)
    out = send(proto, t, b"AUTH PLAIN\r\n*\r\nAUTH PLAIN !!!!\r\nAUTH PLAIN =\r\n")
    assert out == CHALLENGE_EMPTY + CANCELLED + UNDECODABLE + BAD_SYNTAX
    assert proto.auth_failures == 0 and t.connected
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == AUTH_OK


def test_the_421_also_comes_after_an_asynchronous_check():
    h = AuthHandler()
    h.hold.add("authenticate")
    proto, t, h, clock = tls_session(handler=h, auth_failures=1)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_BAD + b"\r\nNOOP\r\n") == b""
    h.release("authenticate")
    assert take(t) == INVALID + TOO_MANY_FAILURES
    assert not t.connected


def test_pipelined_commands_wait_for_the_check():
    h = AuthHandler()
    h.hold.add("authenticate")
    proto, t, h, clock = tls_session(handler=h)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\nMAIL FROM:<alice@example.com>\r\n") == b""
    assert not any(c[0] == "mail" for c in h.calls)
    h.release("authenticate")
    assert take(t) == AUTH_OK + SENDER_OK


# -- every segmentation gives the same session ------------------------------------------------

SCRIPT = (b"EHLO client.example\r\n"
          b"AUTH PLAIN\r\n"
          b"*\r\n"
          b"AUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64("wrong") + b"\r\n"
          b"AUTH PLAIN !!!!\r\n"
          b"AUTH LOGIN " + b64(USER) + b"\r\n" + b64(SECRET) + b"\r\n"
          b"AUTH PLAIN " + PLAIN_OK + b"\r\n"
          b"MAIL FROM:<alice@example.com>\r\n"
          b"AUTH PLAIN\r\n"
          b"QUIT\r\n")
EXPECTED = (EHLO_TLS_AUTH + CHALLENGE_EMPTY + CANCELLED + USERNAME + PASSWORD + INVALID
            + UNDECODABLE + PASSWORD + AUTH_OK + ALREADY_AUTHENTICATED + SENDER_OK
            + ALREADY_AUTHENTICATED + BYE)
EXPECTED_CALLS = [("helo", "client.example", True), ("authenticate", USER, "wrong"),
                  ("authenticate", USER, SECRET), ("mail", USER, {})]


def run_script(deliver, hold=False):
    h = AuthHandler()
    if hold:
        h.hold.add("authenticate")
    proto, t, h, clock = connect(implicit_tls=True, tls_available=False, handler=h)
    deliver(proto)
    while h.held:
        h.release("authenticate")
    calls = [c for c in h.calls if c[0] not in ("connected", "data_abort", "disconnected")]
    return t.value(), calls


def test_script_in_one_piece():
    out, calls = run_script(lambda p: p.dataReceived(SCRIPT))
    assert out == EXPECTED
    assert calls == EXPECTED_CALLS


def test_script_at_every_two_piece_split():
    for cut in range(1, len(SCRIPT)):
        out, calls = run_script(lambda p: feed(p, SCRIPT, cut))
        assert (cut, out) == (cut, EXPECTED)
        assert calls == EXPECTED_CALLS


def test_script_byte_by_byte():
    out, calls = run_script(lambda p: feed_bytewise(p, SCRIPT))
    assert out == EXPECTED
    assert calls == EXPECTED_CALLS


@pytest.mark.parametrize("deliver", [
    lambda p: p.dataReceived(SCRIPT),
    lambda p: feed_bytewise(p, SCRIPT),
    lambda p: [p.dataReceived(line + b"\n") for line in SCRIPT.split(b"\n")[:-1]],
], ids=["one-piece", "bytewise", "linewise"])
def test_script_with_a_slow_checker(deliver):
    out, calls = run_script(deliver, hold=True)
    assert out == EXPECTED
    assert calls == EXPECTED_CALLS


def test_a_deferred_failure_of_the_checker_is_a_temporary_error_and_no_login():
    h = AuthHandler()
    h.hold.add("authenticate")
    proto, t, h, clock = tls_session(handler=h)
    assert send(proto, t, b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == b""
    h.fail("authenticate", RuntimeError("checker broke"))
    assert take(t) == b"451 4.3.0 Error: local I/O error, try again later\r\n"
    assert proto.auth_user is None
    assert send(proto, t, b"MAIL FROM:<alice@example.com>\r\n") == SENDER_OK  # FakeHandler accepts


def test_starttls_then_auth_every_split_of_the_tls_part():
    """The part after the handshake, in every two-piece split."""
    part = b"EHLO c.example\r\nAUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64(SECRET) + b"\r\nNOOP\r\n"
    expected = EHLO_TLS_AUTH + USERNAME + PASSWORD + AUTH_OK + OK
    for cut in range(0, len(part) + 1):
        proto, t, h, clock = connect()
        assert send(proto, t, b"EHLO c.example\r\nSTARTTLS\r\n") == EHLO_CLEAR + READY
        feed(proto, part, cut)
        assert (cut, take(t)) == (cut, expected)

