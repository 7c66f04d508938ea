"""RFC 5321 (and RFC 6531) path parsing, strictly.

The relay decision and later delivery both use the :class:`Mailbox` this module
returns, never the raw text the client sent, so a trick that fools one cannot fool
the other.  Source routes are parsed and discarded (RFC 5321 section 4.1.1.3 and
appendix C); ``%`` and ``!`` are ordinary local-part characters, never routing.
Anything outside the grammar is rejected with the enhanced code for the side it
came from: 5.1.7 for the sender, 5.1.3 for a recipient, 5.6.7 for non-ASCII
without SMTPUTF8.
"""
import ipaddress
import re

from mailsys.smtp.reply import Reply

MAX_LOCAL = 64      # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255    # RFC 5321 4.5.3.1.2
MAX_PATH = 256      # RFC 5321 4.5.3.1.3, including the angle brackets

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*\Z")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_QTEXT_OR_PAIR = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\Z')
_QTEXT_OR_PAIR_UTF8 = re.compile(r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*\Z')
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
# The common case in one match: <dot-atom@ldh-domain>, ASCII, no route, no
# quotes.  What it accepts, the full parse below accepts with the same result
# (tests/test_address.py holds the two to that); anything else, including an
# over-long part, takes the full parse and its exact refusal.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:{_LABEL}\.)*{_LABEL})>\Z")


class AddressError(Exception):
    """The path is not acceptable; ``reply`` says why, in the client's terms."""

    def __init__(self, reply):
        super().__init__(str(reply))
        self.reply = reply


class Mailbox:
    """A parsed ``Local-part@Domain``: the only address form the rest of mailsys sees.

    ``local`` is kept as sent (quoted form included when quoting is needed);
    ``domain`` is lowercased (domains are case-insensitive; local parts are not,
    RFC 5321 2.4).  ``str()`` gives the RFC 5321 text again.
    """

    __slots__ = ("local", "domain", "utf8")

    def __init__(self, local, domain, utf8=False):
        self.local = local
        self.domain = domain
        self.utf8 = utf8

    def __str__(self):
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def __repr__(self):
        return f"Mailbox({self.local!r}, {self.domain!r})"

    def __eq__(self, other):
        return isinstance(other, Mailbox) and (self.local, self.domain) == (other.local, other.domain)

    def __hash__(self):
        return hash((self.local, self.domain))

    @property
    def is_ip_literal(self):
        return self.domain.startswith("[")


def _fail(side, status, text):
    code = 553 if status == "5.6.7" else 501
    return AddressError(Reply(code, status, text))


def _syntax(side):
    status = "5.1.7" if side == "sender" else "5.1.3"
    what = "sender" if side == "sender" else "recipient"
    return _fail(side, status, f"Bad {what} address syntax")


def parse_domain(text, utf8=False):
    """Validate a Domain or address-literal; return it normalised, or None."""
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        return None
    if text.startswith("["):
        return _parse_literal(text)
    if text.endswith("."):
        return None
    labels = text.split(".")
    out = []
    for label in labels:
        if _LDH_LABEL.match(label):
            out.append(label.lower())
            continue
        if utf8 and not label.isascii():
            # A U-label (RFC 6531): it must convert to a valid A-label.
            try:
                alabel = label.encode("idna").decode("ascii")
            except UnicodeError:
                return None
            if not _LDH_LABEL.match(alabel):
                return None
            out.append(label.lower())
            continue
        return None
    return ".".join(out)


def _parse_literal(text):
    if not text.endswith("]"):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        if "%" in inner:
            return None  # RFC 5321's IPv6-addr has no zone index
        try:
            addr = ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return None
        return f"[IPv6:{addr.compressed}]"
    if ":" in inner:
        return text if _GENERAL_LITERAL.match(inner) else None
    parts = inner.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    try:
        addr = ipaddress.IPv4Address(inner)
    except ValueError:
        return None
    return f"[{addr}]"


def _parse_local(local, utf8):
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return None
        inner = local[1:-1]
        pattern = _QTEXT_OR_PAIR_UTF8 if utf8 else _QTEXT_OR_PAIR
        if not pattern.match(inner):
            return None
        # Unquote when quoting was not needed, so "bob"@x and bob@x are one user.
        plain = re.sub(r"\\(.)", r"\1", inner)
        if _DOT_STRING.match(plain) or (utf8 and _DOT_STRING_UTF8.match(plain)):
            return plain
        return local
    pattern = _DOT_STRING_UTF8 if utf8 else _DOT_STRING
    return local if pattern.match(local) else None


def _split_mailbox(text):
    """Split at the '@' that separates local part and domain (quotes respected)."""
    if text.startswith('"'):
        i, n = 1, len(text)
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                break
            i += 1
        else:
            return None
        if text[i + 1:i + 2] != "@":
            return None
        return text[:i + 1], text[i + 2:]
    at = text.rfind("@")
    if at < 0:
        return None
    return text[:at], text[at + 1:]


def parse_path(text, side, smtputf8=False, allow_null=False):
    """Parse the argument of MAIL FROM:/RCPT TO: up to its closing '>'.

    ``text`` is everything after the colon, parameters excluded by the caller
    (see :func:`split_path_and_params`).  Returns a :class:`Mailbox`, or None for
    the null path ``<>`` when ``allow_null``.  Raises :class:`AddressError`.
    """
    simple = _SIMPLE_PATH.match(text)
    if simple is not None and len(text) <= MAX_PATH:
        local, domain = simple.groups()
        if len(local) <= MAX_LOCAL:
            return Mailbox(local, domain.lower())
    if any(c in text for c in "\x00\r\n"):
        raise _syntax(side)
    if not text.isascii() and not smtputf8:
        what = "sender" if side == "sender" else "recipient"
        raise _fail(side, "5.6.7", f"Non-ASCII {what} address requires SMTPUTF8")
    if len(text.encode("utf-8")) > MAX_PATH:
        raise _fail(side, "5.1.7" if side == "sender" else "5.1.3", "Path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise _syntax(side)
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise _syntax(side)
    if inner.startswith("@"):
        # A-d-l ":" Mailbox: validate the route, then discard it.
        colon = inner.find(":")
        if colon < 0:
            raise _syntax(side)
        for hop in inner[:colon].split(","):
            if not hop.startswith("@") or parse_domain(hop[1:], smtputf8) is None:
                raise _syntax(side)
        inner = inner[colon + 1:]
    if side == "recipient" and inner.lower() == "postmaster":
        # RFC 5321 4.1.1.3: "Postmaster" without a domain must be accepted.
        return Mailbox("postmaster", "")
    parts = _split_mailbox(inner)
    if parts is None:
        raise _syntax(side)
    local, domain = parts
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise _fail(side, "5.1.7" if side == "sender" else "5.1.3", "Local part too long")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _fail(side, "5.1.7" if side == "sender" else "5.1.2", "Domain name too long")
    local = _parse_local(local, smtputf8)
    domain = parse_domain(domain, smtputf8)
    if local is None or domain is None:
        raise _syntax(side)
    return Mailbox(local, domain, utf8=not (local.isascii() and domain.isascii()))


def split_path_and_params(arg):
    """Split ``<path> PARAM=VALUE ...`` into the path text and the parameter text.

    The path ends at the first '>' outside a quoted string; a '>' or space inside
    quotes belongs to the local part.
    """
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        # RFC 5321 requires brackets; without them there is no path to find.
        path, _, rest = arg.partition(" ")
        return path, rest
    end = arg.find(">")
    if end > 0 and '"' not in arg[:end]:
        return arg[:end + 1], arg[end + 1:]     # no quotes before it: the first '>' ends the path
    return _split_scan(arg)


def _split_scan(arg):
    """:func:`split_path_and_params` for a bracketed ``arg``, quotes respected,
    a character at a time."""
    quoted = False
    i, n = 1, len(arg)
    while i < n:
        c = arg[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return arg[:i + 1], arg[i + 1:]
        i += 1
    return arg, ""
