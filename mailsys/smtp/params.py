"""MAIL and RCPT parameters: SIZE (1870), BODY (6152), SMTPUTF8 (6531), DSN (3461).

Parsed and validated here so the state machine only sees typed values and the
queue record keeps exactly what the client asked for.

Two private MAIL parameters exist between our queue and our own MDA, accepted
only where the LMTP server advertises ``XQID`` (docs/mda.rst, "Exactly once after
a crash"): ``XQID=<queue id>`` and the bare ``XREDELIVERY``.  Everywhere else they
are unknown options (``555 5.5.4``).
"""
import re

from mailsys.smtp.address import AddressError, parse_path
from mailsys.smtp.reply import Reply

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
MAX_ENVID = 100   # RFC 3461 4.4
# Our queue ids (mailsys.spool.QueueIds): upper-case hex, 17 digits today, at most 20.
QUEUE_ID = re.compile(r"[0-9A-F]{1,20}\Z")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")   # not allowed in a parameter value


class ParamError(Exception):
    def __init__(self, reply):
        super().__init__(str(reply))
        self.reply = reply


def _bad(text, code=501, status="5.5.4"):
    return ParamError(Reply(code, status, text))


def decode_xtext(value):
    """RFC 3461 xtext to text (octets read as UTF-8); ValueError on malformed input."""
    if not _XTEXT.match(value):
        raise ValueError("bad xtext")
    raw = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode("ascii"))
    return raw.decode("utf-8")


def encode_xtext(text):
    """Text to RFC 3461 xtext; characters beyond ASCII go as their UTF-8 octets."""
    return "".join(chr(b) if 0x21 <= b <= 0x7e and b not in b"+=" else f"+{b:02X}"
                   for b in text.encode("utf-8"))


def _printable_ascii(text):
    return all(0x20 <= ord(c) <= 0x7e for c in text)


def _split(text):
    """``KEY=VALUE KEY ...`` into an ordered list of (UPPER-KEY, value or None)."""
    out = []
    seen = set()
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            # Echo the item only when it is safe to put on the wire as it is.
            shown = item[:40] if item.isascii() and item.isprintable() else ""
            raise _bad(f"Bad parameter syntax: {shown}" if shown else "Bad parameter syntax")
        if _CONTROL_OR_SPACE.search(value):
            raise _bad("Bad characters in parameter value")
        ukey = key.upper()
        if ukey in seen:
            raise _bad(f"Duplicate parameter: {ukey}")
        seen.add(ukey)
        out.append((ukey, value if eq else None))
    return out


class MailParams:
    """What MAIL FROM asked for."""

    __slots__ = ("size", "body", "smtputf8", "ret", "envid", "xqid", "redelivery")
    _PUBLIC = ("size", "body", "smtputf8", "ret", "envid")

    def __init__(self):
        self.size = None
        self.body = None
        self.smtputf8 = False
        self.ret = None
        self.envid = None
        self.xqid = None           # XQID: the sending queue's id (LMTP from our own queue)
        self.redelivery = False    # XREDELIVERY: the queue recovered this message after a crash

    def as_dict(self):
        """The standard parameters given (what a queue record keeps)."""
        return {k: getattr(self, k) for k in self._PUBLIC if getattr(self, k) not in (None, False)}


class RcptParams:
    __slots__ = ("notify", "orcpt")

    def __init__(self):
        self.notify = None   # tuple of NEVER | SUCCESS, FAILURE, DELAY
        self.orcpt = None    # (addr-type, address)

    def as_dict(self):
        d = {}
        if self.notify is not None:
            d["notify"] = list(self.notify)
        if self.orcpt is not None:
            d["orcpt"] = list(self.orcpt)
        return d


def parse_mail_params(text, max_size, private=(), auth=False):
    """Parse MAIL parameters; ``max_size`` is the SIZE limit we advertise,
    ``private`` the private keywords advertised (``"XQID"`` or nothing),
    ``auth`` whether the AUTH extension is offered on this connection."""
    p = MailParams()
    for key, value in _split(text):
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise _bad("Bad SIZE parameter")
            p.size = int(value)
            if max_size and p.size > max_size:
                raise ParamError(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
        elif key == "BODY":
            v = (value or "").upper()
            if v not in ("7BIT", "8BITMIME"):
                raise ParamError(Reply(555, "5.5.4", f"Unsupported BODY type: {(value or '')[:20]}"))
            p.body = v
        elif key == "SMTPUTF8":
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            p.smtputf8 = True
        elif key == "RET":
            v = (value or "").upper()
            if v not in ("FULL", "HDRS"):
                raise _bad("Bad RET parameter")
            p.ret = v
        elif key == "ENVID":
            try:
                envid = decode_xtext(value or "")
            except ValueError:
                raise _bad("Bad ENVID parameter")
            if not envid or len(envid) > MAX_ENVID or not _printable_ascii(envid):
                raise _bad("Bad ENVID parameter")
            p.envid = envid
        elif key == "AUTH" and auth:
            # RFC 4954 5: the identity a relaying client says submitted the
            # message ("<>": unknown).  Its syntax is checked and the value is
            # not used: mailsys knows who logged in, and trusts nothing else
            # (Postfix, unless told otherwise, does the same).  Satellite MTAs
            # send it, Postfix's with smtp_send_dummy_mail_auth = yes.
            if value != "<>":
                try:
                    identity = decode_xtext(value or "")
                except ValueError:
                    raise _bad("Bad AUTH parameter")
                if not identity or len(identity) > 500 or not _printable_ascii(identity):
                    raise _bad("Bad AUTH parameter")
        elif key == "XQID" and "XQID" in private:
            if value is None or not QUEUE_ID.match(value):
                raise _bad("Bad XQID parameter")
            p.xqid = value
        elif key == "XREDELIVERY" and "XQID" in private:
            if value is not None:
                raise _bad("XREDELIVERY takes no value")
            p.redelivery = True
        else:
            raise ParamError(Reply(555, "5.5.4", f"Unsupported option: {key[:30]}"))
    if p.redelivery and p.xqid is None:
        raise _bad("XREDELIVERY needs XQID")
    return p


_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


def parse_rcpt_params(text, smtputf8=False):
    p = RcptParams()
    for key, value in _split(text):
        if key == "NOTIFY":
            items = (value or "").upper().split(",")
            if items == ["NEVER"]:
                p.notify = ("NEVER",)
            elif items and all(i in _NOTIFY for i in items) and len(set(items)) == len(items):
                p.notify = tuple(items)
            else:
                raise _bad("Bad NOTIFY parameter")
        elif key == "ORCPT":
            p.orcpt = _parse_orcpt(value or "", smtputf8)
        else:
            raise ParamError(Reply(555, "5.5.4", f"Unsupported option: {key[:30]}"))
    return p


def _parse_orcpt(value, smtputf8):
    addr_type, semi, addr = value.partition(";")
    if not semi or not _KEYWORD.match(addr_type) or not addr:
        raise _bad("Bad ORCPT parameter")
    atype = addr_type.lower()
    if atype == "utf-8":
        # RFC 6533 utf-8-addr-xtext: \x{HEX} escapes; keep as sent after a sanity check.
        if len(addr) > 500:
            raise _bad("Bad ORCPT parameter")
        return (atype, addr)
    try:
        decoded = decode_xtext(addr)
    except ValueError:
        raise _bad("Bad ORCPT parameter")
    if atype == "rfc822":
        try:
            parse_path(f"<{decoded}>", "recipient", smtputf8=smtputf8)
        except AddressError:
            raise _bad("Bad ORCPT address")
    elif len(decoded) > 500 or not _printable_ascii(decoded):
        # It ends up in a DSN's Original-Recipient field: no control characters.
        raise _bad("Bad ORCPT parameter")
    return (atype, decoded)
