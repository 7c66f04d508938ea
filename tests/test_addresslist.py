"""mailsys.addresslist: address lists in header fields and sendmail arguments."""
import pytest

from mailsys.addresslist import Unparsed, parse, qualify


@pytest.mark.parametrize("text, specs", [
    ("root", ["root"]),
    ("root (Cron Daemon)", ["root"]),
    ('Joe <joe>, ann@example.org, "B, O" <bob@example.net>', ["joe", "ann@example.org",
                                                               "bob@example.net"]),
    ('"john smith" (c) . x @ example.com', ['"john smith".x@example.com']),
    ("<@relay.example:joe@example.com>", ["joe@example.com"]),
    ("<>", [""]),
    ("a,,b,", ["a", "b"]),
    ("Friends: a, b@example.com;, c", ["a", "b@example.com", "c"]),
    ("undisclosed-recipients:;", []),
    ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
    ("", []),
])
def test_parse_finds_each_addr_spec(text, specs):
    assert [a.spec for a in parse(text)] == specs


@pytest.mark.parametrize("text", [
    "a b@example.com", 'x "unclosed', "joe (unclosed", "root.", "a@", "<joe", "joe>",
    "<<joe>>", "Joe <joe> x", "G: a", "a; b", "G: a; b", ": a;", "<joe@[1.2]3]>", "a\x00b",
])
def test_parse_refuses_what_it_would_have_to_guess(text):
    with pytest.raises(Unparsed):
        parse(text)


@pytest.mark.parametrize("text, expected", [
    (" root (Cron Daemon)", " root@example.com (Cron Daemon)"),
    (" root", " root@example.com"),
    (' "Joe, Jr." <joe> (x), ann@example.org,\r\n\tbob',
     ' "Joe, Jr." <joe@example.com> (x), ann@example.org,\r\n\tbob@example.com'),
    (' =?utf-8?q?Jos=C3=A9?= <jose >', ' =?utf-8?q?Jos=C3=A9?= <jose@example.com >'),
    (' "a b"', ' "a b"@example.com'),
    # kept: qualified already, null, routed, groups, unparseable
    (" joe@example.net (Joe)", " joe@example.net (Joe)"),
    (" <>", " <>"),
    (" <@relay:joe>", " <@relay:joe>"),
    (" Team: ann, bob;, carol", " Team: ann, bob;, carol@example.com"),
    (" undisclosed-recipients:;", " undisclosed-recipients:;"),
    (" root, Joe Smith joe", " root, Joe Smith joe"),
    (' root "unclosed', ' root "unclosed'),
])
def test_qualify_appends_the_domain_to_bare_local_parts_only(text, expected):
    assert qualify(text, "example.com") == expected
