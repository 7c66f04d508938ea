"""mailsys.smtp.params: MAIL and RCPT parameters with the exact reply for each refusal."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from mailsys.smtp.params import (ParamError, decode_xtext, encode_xtext, parse_mail_params,
                                 parse_rcpt_params)
from mailsys.smtp.reply import Reply

LIMIT = 1000


def mail_refusal(text, limit=LIMIT):
    with pytest.raises(ParamError) as info:
        parse_mail_params(text, limit)
    return info.value.reply


def rcpt_refusal(text, smtputf8=False):
    with pytest.raises(ParamError) as info:
        parse_rcpt_params(text, smtputf8)
    return info.value.reply


def syntax(text):
    return Reply(501, "5.5.4", text)


# -- MAIL: the empty case and combinations ---------------------------------------------

def test_no_parameters():
    p = parse_mail_params("", LIMIT)
    assert (p.size, p.body, p.smtputf8, p.ret, p.envid) == (None, None, False, None, None)
    assert p.as_dict() == {}


def test_all_parameters_together_and_spacing():
    p = parse_mail_params("  size=500   Body=8bitmime SMTPUTF8 ret=hdrs ENVID=QQ+2B1 ", LIMIT)
    assert (p.size, p.body, p.smtputf8, p.ret, p.envid) == (500, "8BITMIME", True, "HDRS", "QQ+1")
    assert p.as_dict() == {"size": 500, "body": "8BITMIME", "smtputf8": True, "ret": "HDRS",
                           "envid": "QQ+1"}


# -- SIZE ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, size", [("0", 0), ("1", 1), ("999", 999), ("1000", 1000),
                                         ("0001000", 1000)])
def test_size_accepted(value, size):
    assert parse_mail_params(f"SIZE={value}", LIMIT).size == size


def test_size_over_limit():
    assert mail_refusal("SIZE=1001") == Reply(552, "5.3.4", "Message size exceeds fixed limit")
    assert mail_refusal("SIZE=" + "9" * 20) == Reply(552, "5.3.4", "Message size exceeds fixed limit")


def test_size_without_limit():
    assert parse_mail_params("SIZE=99999999999", 0).size == 99999999999


@pytest.mark.parametrize("text", ["SIZE", "SIZE=abc", "SIZE=-1", "SIZE=+1", "SIZE=1.5", "SIZE=1e3",
                                  "SIZE=0x10", "SIZE=" + "1" * 21])
def test_size_malformed(text):
    assert mail_refusal(text) == syntax("Bad SIZE parameter")


@pytest.mark.parametrize("value", ["²", "¹²", "①"])
def test_size_with_non_ascii_digit_characters_is_a_syntax_error(value):
    # str.isdigit() is true for these, int() is not: the answer must still be 501.
    assert mail_refusal(f"SIZE={value}") == syntax("Bad SIZE parameter")


def test_size_with_non_ascii_decimal_digits_is_a_syntax_error():
    # RFC 1870: size-value ::= 1*20DIGIT, ASCII digits only; Arabic-Indic digits are not a size.
    assert mail_refusal("SIZE=\u0661\u0662\u0663") == syntax("Bad SIZE parameter")


def test_size_empty_value():
    assert mail_refusal("SIZE=") == syntax("Bad parameter syntax: SIZE=")


# -- BODY ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, body", [("7BIT", "7BIT"), ("8BITMIME", "8BITMIME"),
                                         ("8bitmime", "8BITMIME"), ("7bit", "7BIT")])
def test_body_accepted(value, body):
    assert parse_mail_params(f"BODY={value}", LIMIT).body == body


def test_body_refused():
    assert mail_refusal("BODY=BINARYMIME") == Reply(555, "5.5.4", "Unsupported BODY type: BINARYMIME")
    assert mail_refusal("BODY=8BIT") == Reply(555, "5.5.4", "Unsupported BODY type: 8BIT")
    assert mail_refusal("BODY") == Reply(555, "5.5.4", "Unsupported BODY type: ")
    assert mail_refusal("BODY=" + "X" * 50) == Reply(555, "5.5.4", "Unsupported BODY type: " + "X" * 20)


# -- SMTPUTF8 ------------------------------------------------------------------------

def test_smtputf8():
    assert parse_mail_params("SMTPUTF8", LIMIT).smtputf8 is True
    assert parse_mail_params("smtputf8", LIMIT).smtputf8 is True
    assert mail_refusal("SMTPUTF8=yes") == syntax("SMTPUTF8 takes no value")


# -- RET -------------------------------------------------------------------------------

def test_ret():
    assert parse_mail_params("RET=FULL", LIMIT).ret == "FULL"
    assert parse_mail_params("RET=hdrs", LIMIT).ret == "HDRS"
    assert mail_refusal("RET=ALL") == syntax("Bad RET parameter")
    assert mail_refusal("RET") == syntax("Bad RET parameter")
    assert mail_refusal("RET=FULL,HDRS") == syntax("Bad RET parameter")


# -- ENVID -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, envid", [
    ("abc", "abc"),
    ("QQ+2B1", "QQ+1"),
    ("a+3Db", "a=b"),
    ("+41+42", "AB"),
    ("x" * 100, "x" * 100),
    ("+2B" * 100, "+" * 100),      # the limit is on the decoded text
    ("<1234@host.example>", "<1234@host.example>"),
])
def test_envid_accepted(value, envid):
    assert parse_mail_params(f"ENVID={value}", LIMIT).envid == envid


@pytest.mark.parametrize("value", [
    "x" * 101,
    "+2B" * 101,
    "a+2b",          # hex digits must be upper case
    "a+2",
    "a+",
    "a+GG",
    "a=b",           # '=' must be encoded
    "a+2Bb+0D+0A",   # decodes to CR LF
    "+00",
    "+7F",
])
def test_envid_refused(value):
    assert mail_refusal(f"ENVID={value}") == syntax("Bad ENVID parameter")


def test_envid_empty():
    assert mail_refusal("ENVID=") == syntax("Bad parameter syntax: ENVID=")
    assert mail_refusal("ENVID") == syntax("Bad ENVID parameter")


@pytest.mark.parametrize("value", ["+E9", "caf+C3+A9", "+80", "+FF"])
def test_envid_must_decode_to_us_ascii(value):
    # RFC 3461 4.4: the ENVID is printable US-ASCII (encoded as xtext); an
    # xtext escape of an octet above 0x7E does not make it so.
    assert mail_refusal(f"ENVID={value}") == syntax("Bad ENVID parameter")


# -- generic syntax ---------------------------------------------------------------------

@pytest.mark.parametrize("text, dup", [("SIZE=1 SIZE=2", "SIZE"), ("SIZE=1 size=1", "SIZE"),
                                       ("BODY=7BIT body=8BITMIME", "BODY"), ("SMTPUTF8 SMTPUTF8", "SMTPUTF8"),
                                       ("RET=FULL RET=HDRS", "RET"), ("ENVID=a ENVID=b", "ENVID")])
def test_duplicate_mail_parameters(text, dup):
    assert mail_refusal(text) == syntax(f"Duplicate parameter: {dup}")


@pytest.mark.parametrize("text, key", [("FOO=bar", "FOO"), ("AUTH=<>", "AUTH"), ("X-TAG", "X-TAG"),
                                       ("NOTIFY=NEVER", "NOTIFY"), ("ORCPT=rfc822;a@b", "ORCPT"),
                                       ("a" * 50, "A" * 30)])
def test_unknown_mail_parameters(text, key):
    assert mail_refusal(text) == Reply(555, "5.5.4", f"Unsupported option: {key}")


@pytest.mark.parametrize("value", ["<>", "alice@example.com", "alice+2Btag@example.com",
                                   "+22quoted+20name+22@example.com"])
def test_auth_parameter_where_auth_is_offered(value):
    """RFC 4954 5: a server offering AUTH takes MAIL's AUTH= (and uses nothing
    of it: who logged in is known)."""
    p = parse_mail_params(f"AUTH={value} SIZE=10", LIMIT, auth=True)
    assert p.size == 10 and p.as_dict() == {"size": 10}


@pytest.mark.parametrize("value", ["+ZZ", "+0A@example.com", "a" * 501])
def test_bad_auth_parameter(value):
    with pytest.raises(ParamError) as info:
        parse_mail_params(f"AUTH={value}", LIMIT, auth=True)
    assert info.value.reply == syntax("Bad AUTH parameter")
    with pytest.raises(ParamError) as info:
        parse_mail_params("AUTH=<> AUTH=<>", LIMIT, auth=True)
    assert info.value.reply == syntax("Duplicate parameter: AUTH")


@pytest.mark.parametrize("item", ["-X=1", "=1", "SI_ZE=1", "SIZE==1"])
def test_bad_parameter_keyword(item):
    if item == "SIZE==1":
        assert mail_refusal(item) == syntax("Bad SIZE parameter")
        return
    assert mail_refusal(item) == syntax(f"Bad parameter syntax: {item}")


@pytest.mark.parametrize("value", ["a\x7fb", "a\x01", "a\tb", "a\rb"])
def test_control_characters_in_values(value):
    assert mail_refusal(f"ENVID={value}") == syntax("Bad characters in parameter value")
    assert rcpt_refusal(f"ORCPT=rfc822;{value}") == syntax("Bad characters in parameter value")


@pytest.mark.parametrize("item", ["A\rB=1", "X\r", "\rX-Injected:", "A\x00B"])
def test_control_characters_in_keywords_give_a_501(item):
    # The refusal must be a ParamError (501 5.5.4) whose text can go on the wire,
    # not an exception from building a Reply that echoes a CR.
    for parse in (lambda: parse_mail_params(item, LIMIT), lambda: parse_rcpt_params(item)):
        with pytest.raises(ParamError) as info:
            parse()
        r = info.value.reply
        assert (r.code, r.status) == (501, "5.5.4")
        assert b"\r" not in r.to_bytes()[:-2] and b"\x00" not in r.to_bytes()


# -- RCPT: NOTIFY ----------------------------------------------------------------------

@pytest.mark.parametrize("value, notify", [
    ("NEVER", ("NEVER",)), ("never", ("NEVER",)), ("SUCCESS", ("SUCCESS",)),
    ("SUCCESS,FAILURE", ("SUCCESS", "FAILURE")), ("delay,failure,success", ("DELAY", "FAILURE", "SUCCESS")),
])
def test_notify_accepted(value, notify):
    p = parse_rcpt_params(f"NOTIFY={value}")
    assert p.notify == notify
    assert p.as_dict() == {"notify": list(notify)}


@pytest.mark.parametrize("value", ["NEVER,SUCCESS", "SUCCESS,NEVER", "SUCCESS,SUCCESS", "FOO", "SUCCESS,",
                                   ",SUCCESS", "SUCCESS;FAILURE"])
def test_notify_refused(value):
    assert rcpt_refusal(f"NOTIFY={value}") == syntax("Bad NOTIFY parameter")


def test_notify_without_value():
    assert rcpt_refusal("NOTIFY") == syntax("Bad NOTIFY parameter")
    assert rcpt_refusal("NOTIFY=") == syntax("Bad parameter syntax: NOTIFY=")


# -- RCPT: ORCPT -----------------------------------------------------------------------

@pytest.mark.parametrize("value, orcpt", [
    ("rfc822;bob@example.com", ("rfc822", "bob@example.com")),
    ("RFC822;Bob@Example.com", ("rfc822", "Bob@Example.com")),       # kept as sent
    ("rfc822;bob+2Btag@example.com", ("rfc822", "bob+tag@example.com")),
    ("rfc822;postmaster", ("rfc822", "postmaster")),
    ("utf-8;b\\x{00E9}b@example.com", ("utf-8", "b\\x{00E9}b@example.com")),
    ("x-local;anything", ("x-local", "anything")),
])
def test_orcpt_accepted(value, orcpt):
    p = parse_rcpt_params(f"ORCPT={value}")
    assert p.orcpt == orcpt
    assert p.as_dict() == {"orcpt": list(orcpt)}


@pytest.mark.parametrize("value, text", [
    ("rfc822", "Bad ORCPT parameter"),
    ("rfc822;", "Bad ORCPT parameter"),
    (";bob@example.com", "Bad ORCPT parameter"),
    ("rf_c822;bob@example.com", "Bad ORCPT parameter"),
    ("rfc822;bob+2b@example.com", "Bad ORCPT parameter"),       # bad xtext
    ("rfc822;not-an-address", "Bad ORCPT address"),
    ("rfc822;a+40b@c.example+40d.example", "Bad ORCPT address"),
    ("rfc822;a+0D+0A@example.com", "Bad ORCPT address"),
    ("rfc822;b+E9b@example.com", "Bad ORCPT parameter"),          # 8-bit without SMTPUTF8
    ("x-local;" + "a" * 501, "Bad ORCPT parameter"),
    ("utf-8;" + "a" * 501, "Bad ORCPT parameter"),
])
def test_orcpt_refused(value, text):
    assert rcpt_refusal(f"ORCPT={value}") == syntax(text)


@pytest.mark.parametrize("value", ["x-local;a+0D+0AX-Injected:+20yes", "x-local;a+00b", "x-local;a+0Ab"])
def test_orcpt_of_any_type_must_not_decode_to_control_characters(value):
    # The ORCPT goes into the queue record and later into a DSN's Original-Recipient
    # field: a CR/LF/NUL in it is header injection, whatever the address type.
    assert rcpt_refusal(f"ORCPT={value}") == syntax("Bad ORCPT parameter")


def test_rcpt_duplicates_and_unknown():
    assert rcpt_refusal("NOTIFY=NEVER NOTIFY=NEVER") == syntax("Duplicate parameter: NOTIFY")
    assert rcpt_refusal("ORCPT=rfc822;a@b.example orcpt=rfc822;a@b.example") == \
        syntax("Duplicate parameter: ORCPT")
    assert rcpt_refusal("SIZE=10") == Reply(555, "5.5.4", "Unsupported option: SIZE")
    assert rcpt_refusal("FOO") == Reply(555, "5.5.4", "Unsupported option: FOO")


def test_rcpt_both():
    p = parse_rcpt_params("NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a@b.example")
    assert p.as_dict() == {"notify": ["SUCCESS", "DELAY"], "orcpt": ["rfc822", "a@b.example"]}
    assert parse_rcpt_params("").as_dict() == {}


# -- xtext -------------------------------------------------------------------------------

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


def test_xtext_examples():
    assert encode_xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert encode_xtext("\r\n") == "+0D+0A"
    assert decode_xtext("a+2Bb+3Dc+20d") == "a+b=c d"
    assert decode_xtext("") == ""
    for bad in ("+", "+2", "+2g", "+2b", "a b", "a=b", "é", "a\x00"):
        with pytest.raises(ValueError):
            decode_xtext(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F)))
def test_xtext_round_trip(text):
    encoded = encode_xtext(text)
    assert _XTEXT.match(encoded)
    assert encoded.isascii()
    assert decode_xtext(encoded) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="!\"#*+,<=>?@AZaz~09"))
def test_xtext_decode_encode_is_identity_on_canonical_xtext(text):
    # every plain xchar is its own encoding, so decode(encode(t)) == t for it too
    assert decode_xtext(encode_xtext(text)) == text
