"""The SASL decoders (mailsys.smtp.sasl) under property tests.

Whatever a client sends, the decoders either give a result or raise SaslError
carrying the reply: 501 for everything malformed (cancel included), 535 5.7.8 only
for a well-formed PLAIN message whose authorisation identity differs from the
authentication identity.  Valid credentials survive the round trip exactly.
"""
import base64

import pytest
from hypothesis import assume, example, given, settings, strategies as st

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.smtp import sasl
from mailsys.smtp.reply import Reply
from mailsys.smtp.server import SMTPServerProtocol
from tests.helpers import FakeHandler, limits, take

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
BAD_SYNTAX = Reply(501, "5.5.2", "Invalid authentication exchange syntax")
CANCELLED = Reply(501, "5.7.0", "Authentication aborted")
MISMATCH = Reply(535, "5.7.8", "Authentication credentials invalid")


def b64(data):
    return base64.b64encode(data).decode("ascii")


# A credential as a client may legitimately send it: non-empty UTF-8 text, no NUL,
# at most 1024 bytes once encoded.
credential = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                     min_size=1, max_size=200).filter(lambda s: len(s.encode("utf-8")) <= 1024)

# Base64-ish text: mostly from the alphabet, with the odd stray character.
b64ish = st.text(alphabet=st.sampled_from(B64_ALPHABET + "=*- \t!\x00\x80é"), max_size=80)
any_text = st.one_of(st.text(max_size=200), b64ish,
                     st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()))


def outcome(call, *args):
    """('ok', value) or ('error', reply); anything else propagates and fails the test."""
    try:
        return "ok", call(*args)
    except sasl.SaslError as e:
        assert isinstance(e.reply, Reply)
        return "error", e.reply


# -- no exception but SaslError ------------------------------------------------------------

@settings(max_examples=500)
@given(any_text)
@example("*")
@example("=")
@example("")
@example(" * ")
@example("\u00e9\u00e9\u00e9\u00e9")
@example("YQ==YQ==")
def test_decode_response_raises_only_sasl_errors_with_501(text):
    kind, value = outcome(sasl.decode_response, text)
    if kind == "ok":
        assert isinstance(value, bytes)
    else:
        assert value.code == 501, value


@settings(max_examples=500)
@given(st.binary(max_size=300))
@example(b"")
@example(b"\0")
@example(b"\0\0")
@example(b"\0\0\0")
@example(b"\0\0\0\0")
@example(b"a\0b\0c")
@example(b"\0\xff\0x")
def test_decode_plain_agrees_with_rfc_4616(raw):
    """An independent statement of RFC 4616 as this server applies it."""
    parts = raw.split(b"\0")
    expected = None
    if len(parts) != 3:
        expected = ("error", BAD_SYNTAX)
    else:
        authzid, authcid, passwd = parts

        def text_ok(b):
            if not b or len(b) > 1024:
                return False
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                return False
            return True

        if not (text_ok(authcid) and text_ok(passwd)):
            expected = ("error", BAD_SYNTAX)
        elif authzid and authzid != authcid:
            expected = ("error", MISMATCH)
        else:
            expected = ("ok", (authcid.decode("utf-8"), passwd.decode("utf-8")))
    assert outcome(sasl.decode_plain, raw) == expected


@settings(max_examples=400)
@given(st.one_of(st.none(), any_text), any_text)
def test_plain_mechanism_raises_only_sasl_errors(initial, response):
    mech = sasl.Plain()
    kind, challenge = outcome(mech.start, initial)
    if initial is None:
        assert (kind, challenge) == ("ok", "")
        kind, challenge = outcome(mech.step, response)
    if kind == "ok":
        assert challenge is None
        user, password = mech.result
        assert isinstance(user, str) and isinstance(password, str) and user and password
    else:
        assert challenge.code in (501, 535), challenge
        if challenge.code == 535:
            assert challenge == MISMATCH


@settings(max_examples=400)
@given(st.one_of(st.none(), any_text), st.lists(any_text, min_size=1, max_size=3))
def test_login_mechanism_raises_only_sasl_errors(initial, responses):
    mech = sasl.Login()
    kind, challenge = outcome(mech.start, initial)
    for response in responses:
        if kind == "error" or challenge is None:
            break
        assert challenge in (sasl.Login.USERNAME, sasl.Login.PASSWORD)
        kind, challenge = outcome(mech.step, response)
    if kind == "error":
        assert challenge.code == 501, challenge      # LOGIN has no authzid: never 535
    elif challenge is None:
        user, password = mech.result
        assert user and password


# -- malformed input is 501 -------------------------------------------------------------

@given(st.text(max_size=60).filter(lambda s: s.strip() not in ("*", "=")),
       st.sampled_from("!#$%&()*,-.:;<>?@[]^_`{|}~\u00e9\x00\x7f"), st.integers(0, 60))
def test_a_character_outside_the_alphabet_is_501(text, bad, at):
    pos = min(at, len(text))
    text = text[:pos] + bad + text[pos:]
    assume(text.strip() not in ("*", "="))
    assert outcome(sasl.decode_response, text) == ("error", UNDECODABLE)


@given(st.text(alphabet=B64_ALPHABET, min_size=1, max_size=80).filter(lambda s: len(s) % 4))
def test_a_length_not_a_multiple_of_four_is_501(text):
    assert outcome(sasl.decode_response, text) == ("error", UNDECODABLE)


@given(st.binary(min_size=1, max_size=30), st.binary(min_size=1, max_size=30))
def test_data_after_padding_is_501(a, b):
    text = b64(a) + b64(b)
    assume("=" in b64(a))
    assert outcome(sasl.decode_response, text) == ("error", UNDECODABLE)


@pytest.mark.parametrize("text", ["*", " *", "*  "])
def test_star_is_a_cancel_everywhere(text):
    assert outcome(sasl.decode_response, text) == ("error", CANCELLED)
    assert outcome(sasl.Plain().step, text) == ("error", CANCELLED)
    assert outcome(sasl.Plain().start, text) == ("error", CANCELLED)
    assert outcome(sasl.Login().start, text) == ("error", CANCELLED)
    login = sasl.Login()
    login.start(None)
    assert outcome(login.step, text) == ("error", CANCELLED)
    login = sasl.Login()
    login.start(b64(b"user"))
    assert outcome(login.step, text) == ("error", CANCELLED)


@given(st.integers(0, 6).filter(lambda n: n != 2), st.lists(credential, min_size=7, max_size=7))
def test_plain_with_the_wrong_number_of_nuls_is_501(nuls, words):
    raw = "\0".join(words[:nuls + 1]).encode("utf-8")
    assert outcome(sasl.Plain().start, b64(raw) if raw else "=") == ("error", BAD_SYNTAX)


@given(credential, credential, credential)
def test_plain_authzid_other_than_authcid_is_535(authzid, user, password):
    assume(authzid != user)
    raw = f"{authzid}\0{user}\0{password}".encode("utf-8")
    assert outcome(sasl.Plain().start, b64(raw)) == ("error", MISMATCH)


@given(credential)
def test_login_with_an_empty_or_nul_user_or_password_is_501(good):
    for bad in (b"", b"\0", good.encode("utf-8") + b"\0x", b"\xff" + good.encode("utf-8")):
        token = b64(bad) if bad else "="
        mech = sasl.Login()
        assert outcome(mech.start, token) == ("error", BAD_SYNTAX)
        mech = sasl.Login()
        mech.start(b64(good.encode("utf-8")))
        assert outcome(mech.step, token) == ("error", BAD_SYNTAX)


def test_over_long_credentials_are_501():
    long = "x" * 1025
    assert outcome(sasl.decode_plain, f"\0{long}\0pw".encode()) == ("error", BAD_SYNTAX)
    assert outcome(sasl.decode_plain, f"\0user\0{long}".encode()) == ("error", BAD_SYNTAX)
    ok = "x" * 1024
    assert outcome(sasl.decode_plain, f"\0{ok}\0{ok}".encode()) == ("ok", (ok, ok))


# -- round trip ------------------------------------------------------------------------------

@settings(max_examples=300)
@given(credential, credential, st.booleans(), st.booleans())
def test_plain_round_trip(user, password, with_authzid, initial):
    raw = f"{user if with_authzid else ''}\0{user}\0{password}".encode("utf-8")
    mech = sasl.Plain()
    if initial:
        assert mech.start(b64(raw)) is None
    else:
        assert mech.start(None) == ""
        assert mech.step(b64(raw)) is None
    assert mech.result == (user, password)


@settings(max_examples=300)
@given(credential, credential, st.booleans())
def test_login_round_trip(user, password, initial):
    mech = sasl.Login()
    if initial:
        assert mech.start(b64(user.encode("utf-8"))) == sasl.Login.PASSWORD
    else:
        assert mech.start(None) == sasl.Login.USERNAME
        assert mech.step(b64(user.encode("utf-8"))) == sasl.Login.PASSWORD
    assert mech.step(b64(password.encode("utf-8"))) is None
    assert mech.result == (user, password)


@given(st.binary(max_size=200))
def test_decode_response_inverts_base64(data):
    assert sasl.decode_response(b64(data) if data else "=") == data
    # surrounding white space of the line is not part of the response
    assert sasl.decode_response(" " + (b64(data) if data else "=") + "\t") == data


def test_challenges_are_the_documented_base64_prompts():
    assert base64.b64decode(sasl.Login.USERNAME) == b"Username:"
    assert base64.b64decode(sasl.Login.PASSWORD) == b"Password:"
    assert sasl.MECHANISMS == {"PLAIN": sasl.Plain, "LOGIN": sasl.Login}


# -- through the protocol: any response line is 501, 535 or 500 5.5.6, never a crash ---------

class RefusingHandler(FakeHandler):
    def tls_context(self, proto):
        return None

    def authenticate(self, proto, user, password):
        self.calls.append(("authenticate", user, password))
        return Reply(535, "5.7.8", "Authentication credentials invalid")


def _session():
    h = RefusingHandler()
    proto = SMTPServerProtocol(h, "mx.example.com", limits=limits(auth_failures=1000),
                               clock=Clock(), auth_mechanisms=("PLAIN", "LOGIN"))
    proto.tls = True
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO c.example\r\n")
    take(t)
    return proto, t, h


line_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=B64_ALPHABET + "=*", max_size=300).map(str.encode),
    st.binary(max_size=200).map(base64.b64encode),
    st.binary(min_size=2040, max_size=2100),
).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH LOGIN dXNlcg==\r\n"]),
       st.lists(line_bytes, min_size=1, max_size=3))
def test_any_response_line_gets_a_single_documented_reply(start, responses):
    proto, t, h = _session()
    proto.dataReceived(start)
    out = take(t)
    for line in responses:
        if not out.startswith(b"334 "):
            break
        proto.dataReceived(line + b"\r\n")
        out = take(t)
        assert out.count(b"\r\n") == 1, out
        if len(line) + 2 > 2048:
            assert out == b"500 5.5.6 Authentication exchange line is too long\r\n"
        else:
            assert out[:4] in (b"334 ", b"501 ", b"535 "), out
            if out.startswith(b"535 "):
                assert out == b"535 5.7.8 Authentication credentials invalid\r\n"
    # the session survives whatever happened
    proto.dataReceived(b"*\r\nNOOP\r\n")
    assert take(t).endswith(b"250 2.0.0 Ok\r\n")
    assert t.connected
