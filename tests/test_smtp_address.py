"""mailsys.smtp.address: RFC 5321 paths, strictly, with the exact refusal for each side."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from mailsys.smtp.address import (AddressError, Mailbox, parse_domain, parse_path,
                                  split_path_and_params)
from mailsys.smtp.reply import Reply

RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")


def refusal(text, side="recipient", **kw):
    with pytest.raises(AddressError) as info:
        parse_path(text, side, **kw)
    return info.value.reply


# -- accepted forms --------------------------------------------------------------

@pytest.mark.parametrize("text, local, domain", [
    ("<alice@example.com>", "alice", "example.com"),
    ("<Alice.Smith@Example.COM>", "Alice.Smith", "example.com"),      # local case kept
    ("<a+tag@mail.example.com>", "a+tag", "mail.example.com"),
    ("<user%other.org@example.com>", "user%other.org", "example.com"),  # % is not routing
    ("<other.org!user@example.com>", "other.org!user", "example.com"),  # ! is not routing
    ("<@a,@b:u@c>", "u", "c"),                                        # source route dropped
    ("<@relay.one.example,@relay.two.example:u@c.example>", "u", "c.example"),
    ("<@other.org:alice@example.com>", "alice", "example.com"),
    ('<"user@other"@example.com>', '"user@other"', "example.com"),
    ('<"bob"@example.com>', "bob", "example.com"),                     # quoting not needed
    ('<"b\\ob"@example.com>', "bob", "example.com"),                   # quoted-pair not needed
    ('<"first.last"@example.com>', "first.last", "example.com"),
    ('<"a b"@example.com>', '"a b"', "example.com"),                   # quoting needed: kept
    ('<"a..b"@example.com>', '"a..b"', "example.com"),
    ('<"a\\"b"@example.com>', '"a\\"b"', "example.com"),
    ('<"a>b"@example.com>', '"a>b"', "example.com"),
    ("<u@[127.0.0.1]>", "u", "[127.0.0.1]"),
    ("<u@[192.0.2.255]>", "u", "[192.0.2.255]"),
    ("<u@[IPv6:::1]>", "u", "[IPv6:::1]"),
    ("<u@[IPv6:2001:DB8:0:0:0:0:0:1]>", "u", "[IPv6:2001:db8::1]"),
    ("<u@[ipv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]"),
    ("<u@[IPv6:::ffff:192.0.2.1]>", "u", "[IPv6:::ffff:c000:201]"),
    ("<u@xn--bcher-kva.example>", "u", "xn--bcher-kva.example"),
    ("<u@a-b.c0.example>", "u", "a-b.c0.example"),
])
@pytest.mark.parametrize("side", ["recipient", "sender"])
def test_accepted_paths(text, local, domain, side):
    m = parse_path(text, side)
    assert isinstance(m, Mailbox)
    assert (m.local, m.domain) == (local, domain)
    assert str(m) == f"{local}@{domain}"
    assert m.utf8 is False


def test_ip_literal_flag():
    assert parse_path("<u@[127.0.0.1]>", "recipient").is_ip_literal is True
    assert parse_path("<u@example.com>", "recipient").is_ip_literal is False


def test_quoted_and_unquoted_same_user_are_equal():
    assert parse_path('<"bob"@Example.com>', "recipient") == parse_path("<bob@example.com>", "recipient")
    assert hash(parse_path('<"bob"@x.example>', "recipient")) == hash(Mailbox("bob", "x.example"))


# -- rejected forms --------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "alice@example.com",            # no brackets
    "<alice@example.com",
    "alice@example.com>",
    "<alice>",
    "<other.org!user>",             # no domain: ! is not routing
    "<@example.com>",               # route without mailbox
    "<@a u@c>",                     # route without colon
    "<@a,b:u@c>",                   # hop without @
    "<@:u@c>",                      # empty hop
    "<@a:@b:u@c>",
    "<alice@>",
    "<@>",
    "<.alice@example.com>",
    "<alice.@example.com>",
    "<al..ice@example.com>",
    "<al ice@example.com>",
    "<al(ice)@example.com>",
    "<a@b@example.com>",
    '<"alice@example.com>',         # unterminated quote
    '<"al"ice@example.com>',
    '<"a\\\x01"@example.com>',       # quoted-pair of a control
    '<"a\tb"@example.com>',
    "<alice@example.com.>",         # trailing dot
    "<alice@.example.com>",
    "<alice@exa..mple.com>",
    "<alice@-example.com>",
    "<alice@example-.com>",
    "<alice@exa_mple.com>",
    "<alice@" + "a" * 64 + ".com>",  # label over 63
    "<u@[256.0.0.1]>",
    "<u@[1.2.3]>",
    "<u@[1.2.3.4.5]>",
    "<u@[01.2.3.4]>",
    "<u@[1.2.3.04x]>",
    "<u@[IPv6:::g]>",
    "<u@[IPv6:1.2.3.4]>",
    "<u@[127.0.0.1>",
    "<u@127.0.0.1]>",
    "<u@[]>",
])
def test_rejected_paths(text):
    assert refusal(text, "recipient") == RCPT_SYNTAX
    assert refusal(text, "sender") == SENDER_SYNTAX


def test_ipv6_zone_index_is_not_an_address_literal():
    # RFC 5321 4.1.3 IPv6-addr has no zone ("%eth0"); a scoped address is no
    # destination another host can deliver to.
    assert refusal("<u@[IPv6:fe80::1%eth0]>") == RCPT_SYNTAX


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00"])
@pytest.mark.parametrize("where", ["<al{}ice@example.com>", "<alice@exam{}ple.com>",
                                   '<"al{}ice"@example.com>', "<alice@example.com>{}",
                                   "{}<alice@example.com>"])
def test_cr_lf_nul_rejected(bad, where):
    text = where.format(bad)
    assert refusal(text, "recipient") == Reply(501, "5.1.3", "Bad recipient address syntax")
    assert refusal(text, "sender") == Reply(501, "5.1.7", "Bad sender address syntax")
    # even with SMTPUTF8 and even where <> would be allowed
    assert refusal(text, "sender", smtputf8=True, allow_null=True) == SENDER_SYNTAX


def test_cr_in_null_path_rejected():
    assert refusal("<\r>", "sender", allow_null=True) == SENDER_SYNTAX


# -- lengths ---------------------------------------------------------------------

def test_local_part_64_accepted_65_rejected():
    m = parse_path("<" + "a" * 64 + "@example.com>", "recipient")
    assert m.local == "a" * 64
    assert refusal("<" + "a" * 65 + "@example.com>") == Reply(501, "5.1.3", "Local part too long")
    assert refusal("<" + "a" * 65 + "@example.com>", "sender") == Reply(501, "5.1.7", "Local part too long")


def test_quoted_local_part_length_counts_the_quotes():
    assert parse_path('<"' + "a " * 31 + '"@example.com>', "recipient").local == '"' + "a " * 31 + '"'
    assert refusal('<"' + "a " * 31 + 'b"@example.com>') == Reply(501, "5.1.3", "Local part too long")


def _domain_of(length):
    labels = []
    while length > 0:
        n = min(63, length)
        if length - n == 1:       # never leave a 1-char remainder we cannot join
            n -= 1
        labels.append("d" * n)
        length -= n + 1
    d = ".".join(labels)
    return d


def test_domain_helper():
    for n in (1, 63, 64, 65, 127, 189, 190, 255, 256):
        assert len(_domain_of(n)) == n
        assert all(1 <= len(x) <= 63 for x in _domain_of(n).split("."))


def test_path_256_accepted_257_rejected():
    p256 = "<" + "a" * 64 + "@" + _domain_of(189) + ">"
    p257 = "<" + "a" * 64 + "@" + _domain_of(190) + ">"
    assert len(p256) == 256 and len(p257) == 257
    assert str(parse_path(p256, "recipient")) == p256[1:-1]
    assert refusal(p257) == Reply(501, "5.1.3", "Path too long")
    assert refusal(p257, "sender") == Reply(501, "5.1.7", "Path too long")


def test_path_length_counts_the_source_route():
    route = "<@" + _domain_of(200) + ":"
    text = route + "u@" + _domain_of(256 - len(route) - 3) + ">"
    assert len(text) == 256
    assert parse_path(text, "recipient").local == "u"
    text = route + "u@" + _domain_of(257 - len(route) - 3) + ">"
    assert refusal(text) == Reply(501, "5.1.3", "Path too long")


def test_domain_255_accepted_256_rejected():
    d255 = ".".join(["a" * 63] * 4)
    d256 = ".".join(["a" * 63] * 3 + ["a" * 62, "a"])
    assert len(d255) == 255 and len(d256) == 256
    assert parse_domain(d255) == d255
    assert parse_domain(d256) is None
    assert parse_domain(d255.upper()) == d255


def test_path_length_is_in_octets_with_smtputf8():
    local = "é" * 32                     # 64 octets
    assert parse_path(f"<{local}@example.com>", "recipient", smtputf8=True).local == local
    assert refusal(f"<{local}a@example.com>", smtputf8=True) == Reply(501, "5.1.3", "Local part too long")


# -- 8-bit ------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["<usér@example.com>", "<user@exämple.com>", "<用户@例子.广告>",
                                  '<"usér"@example.com>'])
def test_non_ascii_needs_smtputf8(text):
    assert refusal(text, "recipient") == Reply(553, "5.6.7", "Non-ASCII recipient address requires SMTPUTF8")
    assert refusal(text, "sender") == Reply(553, "5.6.7", "Non-ASCII sender address requires SMTPUTF8")


def test_non_ascii_with_smtputf8_accepted():
    m = parse_path("<usér@example.com>", "recipient", smtputf8=True)
    assert (m.local, m.domain, m.utf8) == ("usér", "example.com", True)
    m = parse_path("<用户@例子.广告>", "sender", smtputf8=True)
    assert (m.local, m.domain, m.utf8) == ("用户", "例子.广告", True)
    m = parse_path("<user@Bücher.example>", "recipient", smtputf8=True)
    assert (m.local, m.domain, m.utf8) == ("user", "bücher.example", True)
    m = parse_path('<"us ér"@example.com>', "recipient", smtputf8=True)
    assert m.local == '"us ér"'
    assert parse_path("<ascii@example.com>", "recipient", smtputf8=True).utf8 is False


def test_invalid_u_label_rejected_even_with_smtputf8():
    assert refusal("<u@bü_cher.example>", smtputf8=True) == RCPT_SYNTAX
    assert refusal("<u@" + "ü" * 70 + ".example>", smtputf8=True) == RCPT_SYNTAX


# -- postmaster and <> -------------------------------------------------------------

@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_for_recipients_only(text):
    m = parse_path(text, "recipient")
    assert (m.local, m.domain, str(m)) == ("postmaster", "", "postmaster")
    assert refusal(text, "sender") == SENDER_SYNTAX
    assert refusal(text, "sender", allow_null=True) == SENDER_SYNTAX


def test_other_bare_names_are_not_postmaster():
    assert refusal("<abuse>") == RCPT_SYNTAX
    assert refusal("<postmasters>") == RCPT_SYNTAX


def test_null_path_only_when_allowed():
    assert parse_path("<>", "sender", allow_null=True) is None
    assert refusal("<>", "sender") == SENDER_SYNTAX
    assert refusal("<>", "recipient") == RCPT_SYNTAX
    assert refusal("", "sender", allow_null=True) == SENDER_SYNTAX
    assert refusal("< >", "sender", allow_null=True) == SENDER_SYNTAX


# -- splitting the argument ---------------------------------------------------------

@pytest.mark.parametrize("arg, path, rest", [
    ("<a@b.example> SIZE=10", "<a@b.example>", " SIZE=10"),
    ("<a@b.example>", "<a@b.example>", ""),
    (" <a@b.example> X", "<a@b.example>", " X"),
    ('<"x> y"@b.example> BODY=8BITMIME', '<"x> y"@b.example>', " BODY=8BITMIME"),
    ('<"x\\"> y"@b.example> A', '<"x\\"> y"@b.example>', " A"),
    ("<>", "<>", ""),
    ("a@b.example SIZE=1", "a@b.example", "SIZE=1"),
    ("<a@b.example", "<a@b.example", ""),
])
def test_split_path_and_params(arg, path, rest):
    assert split_path_and_params(arg) == (path, rest)


# -- properties ---------------------------------------------------------------------

_interesting = st.sampled_from(list('<>@"\\:,.[]!% \r\n\x00aZ9-_é') + ["IPv6:", "postmaster", "::1",
                                                                      "127.0.0.1", "xn--", "ü"])


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(), st.lists(_interesting).map("".join),
                      st.lists(_interesting).map(lambda p: "<" + "".join(p) + ">")),
       side=st.sampled_from(["sender", "recipient"]), utf8=st.booleans(), null=st.booleans())
def test_parse_path_raises_only_address_error(text, side, utf8, null):
    try:
        m = parse_path(text, side, smtputf8=utf8, allow_null=null)
    except AddressError as e:
        assert e.reply.code in (501, 553)
        assert e.reply.status in ("5.1.3", "5.1.7", "5.1.2", "5.6.7")
        return
    if m is None:
        assert null and text == "<>"
        return
    s = str(m)
    assert "\r" not in s and "\n" not in s and "\x00" not in s
    assert len(text.encode("utf-8")) <= 256
    if not utf8:
        assert s.isascii()


_ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"
_atom = st.text(alphabet=_ATEXT, min_size=1, max_size=10)
_local = st.lists(_atom, min_size=1, max_size=6).map(".".join).filter(lambda s: len(s) <= 64)
_ALNUM = "abcmxyzABCMXYZ0159"
_label = st.tuples(st.sampled_from(_ALNUM), st.text(alphabet=_ALNUM + "-", max_size=10),
                   st.sampled_from(_ALNUM), st.booleans()).map(
    lambda t: t[0] + (t[1] + t[2] if t[3] else ""))
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)


@settings(max_examples=200, deadline=None)
@given(local=_local, domain=_domain, side=st.sampled_from(["sender", "recipient"]))
def test_round_trip_dot_string_and_ldh_domain(local, domain, side):
    m = parse_path(f"<{local}@{domain}>", side)
    assert str(m) == f"{local}@{domain.lower()}"
    assert (m.local, m.domain) == (local, domain.lower())
    # and again through the quoted form, which needs no quoting
    assert parse_path(f'<"{local}"@{domain}>', side) == m


# --- the fast paths give exactly what the full parse gives ----------------------------------

def _full_parse(text, side, smtputf8=False, allow_null=False):
    import mailsys.smtp.address as address

    saved = address._SIMPLE_PATH
    address._SIMPLE_PATH = re.compile(r"(?!)")       # never matches: the full parse only
    try:
        return address.parse_path(text, side, smtputf8, allow_null)
    finally:
        address._SIMPLE_PATH = saved


def _outcome(f, *args):
    try:
        m = f(*args)
    except AddressError as e:
        return ("refused", e.reply)
    return ("ok", None if m is None else (m.local, m.domain, m.utf8))


_PATH_CHARS = "aZ09.-@<>\"\\ :,[]_+%!é\x00\r\n"


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.text(alphabet=_PATH_CHARS, max_size=40),
    st.builds(lambda l, d: f"<{l}@{d}>", _local, _domain),
    st.builds(lambda l, d, n: f"<{l}@{d}>" + "x" * n, _local, _domain, st.integers(0, 3)),
    st.builds(lambda l, d: f"<{l * 4}@{d * 20}>", _local, _domain),      # over-long parts
    st.builds(lambda l, d: f"<{l}@{d}.>", _local, _domain),
    st.builds(lambda l, d: f"<{l}@[{d}]>", _local, _domain)),
    st.sampled_from(["sender", "recipient"]), st.booleans())
def test_fast_path_parse_equals_the_full_parse(text, side, utf8):
    assert _outcome(parse_path, text, side, utf8, True) == _outcome(_full_parse, text, side, utf8, True)
    assert _outcome(parse_path, text, side, utf8, False) == _outcome(_full_parse, text, side, utf8, False)


def _split_reference(arg):
    """The scan alone (no fast path), for a bracketed argument."""
    from mailsys.smtp.address import _split_scan

    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        return split_path_and_params(arg)
    return _split_scan(arg)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="a<>\"\\ =@", max_size=30))
def test_split_path_and_params_fast_path_equals_the_scan(arg):
    assert split_path_and_params(arg) == _split_reference(arg)
