"""Delivery status notifications (RFC 3464, RFC 3461, RFC 6522, RFC 6533).

A pure module: no I/O, no Twisted.  The queue manager decides *when* a report
is due and *for which recipients* (``wants()``, ``never_bounce()``); this
module turns that decision into the bytes of a complete message, ready to be
spooled with ``MAIL FROM:<>`` to the envelope sender (``dsn_params()`` says
which SMTP parameters the spooled report needs).

The report is a ``multipart/report; report-type=delivery-status`` with three
parts: a short text for people, the machine-readable ``message/delivery-status``
and the original message (``message/rfc822``) or its header section
(``text/rfc822-headers``).  See docs/dsn.rst for what is sent when.

Output guarantees, whatever the envelope, the original or the remote reply
hold: CRLF line ends only (no bare CR or LF), no NUL, no line longer than 998
octets, and nothing from outside can start a header field of its own.  The
first two parts are always 7-bit (non-ASCII addresses in the status fields are
written as RFC 6533 ``utf-8`` addresses in their 7-bit ``utf-8-addr-xtext``
form, the text part is quoted-printable UTF-8 when it needs to be); only the
returned original, as received, and a ``To:`` naming an internationalised
sender can carry 8-bit octets.
"""
import hashlib
import math
import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

__all__ = ["RecipientStatus", "make_report", "wants", "never_bounce", "dsn_params",
           "KINDS", "ACTIONS", "MAX_ORIGINAL"]

KINDS = ("failure", "delay", "success")
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

#: The largest original returned whole (RET=FULL or no RET, failure reports).
#: Larger originals are returned as their header section only, and the text
#: part says so.  Headers are enough to identify the message; the sender keeps
#: a copy, and a report much bigger than this risks being refused on its way
#: back.
MAX_ORIGINAL = 1024 * 1024

MAX_LINE = 998          # RFC 5322 2.1.1, without the CRLF
_FOLD_AT = 78           # preferred length of the fields we write
_MAX_WORD = 900         # longest address (octets) or diagnostic word we write
_CHOP = 960             # a word longer than this is cut in _field: it has no place to fold
_MAX_DIAGNOSTIC = 4000  # characters of remote reply kept per recipient

_SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# A diagnostic that already names its type: "smtp; ..." or "X-Whatever; ...".
_DIAG_TYPE_RE = re.compile(r"\s*(smtp|x-[a-z0-9-]+)\s*;\s*", re.IGNORECASE)
_EMBEDDED_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
# Control characters (C0, DEL, C1), line and paragraph separators, lone surrogates.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_NON_PRINTABLE_RE = re.compile("[^ -~]")

# RFC 3463 texts for the codes a reader is most likely to meet, then per subject.
_DETAIL = {
    "0.0": "other or undefined status",
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.6": "destination mailbox has moved",
    "2.1": "mailbox disabled, not accepting messages",
    "2.2": "mailbox full",
    "2.3": "message length exceeds administrative limit",
    "3.4": "message too big for system",
    "4.1": "no answer from host",
    "4.2": "bad connection",
    "4.3": "directory server failure",
    "4.4": "unable to route",
    "4.6": "routing loop detected",
    "4.7": "delivery time expired",
    "7.1": "delivery not authorized, message refused",
}
_SUBJECT = {
    "0": "other status", "1": "addressing status", "2": "mailbox status",
    "3": "mail system status", "4": "network and routing status",
    "5": "mail delivery protocol status", "6": "message content or media status",
    "7": "security or policy status",
}


@dataclass(frozen=True)
class RecipientStatus:
    """What happened to one recipient, as the report should tell it."""

    rcpt: str                                  # final recipient address as we tried it
    action: str                                # one of ACTIONS
    status: str                                # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str | None = None              # remote reply text, or "type; text"
    remote_mta: str | None = None              # host name of the MTA that answered
    orcpt: tuple[str, str] | None = None       # (addr-type, address) from ORCPT
    last_attempt: float | None = None          # epoch seconds
    will_retry_until: float | None = None      # epoch seconds, "delayed" only


# --------------------------------------------------------------------------
# Policy helpers for the queue


def wants(envelope_rcpt, kind):
    """Whether the recipient's NOTIFY asks for a report of this ``kind``.

    RFC 3461 4.1: without NOTIFY we report failures and delays (the MTA's
    choice; the queue may still disable delay warnings with
    ``queue.warn_after = 0``) but never success; ``NOTIFY=NEVER`` means no
    report at all; otherwise exactly the kinds listed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown report kind: {kind!r}")
    notify = envelope_rcpt.get("notify")
    if notify is None:
        return kind in ("failure", "delay")
    if isinstance(notify, str):
        notify = notify.split(",")
    items = {str(n).strip().upper() for n in notify}
    if "NEVER" in items:
        return False
    return kind.upper() in items


def never_bounce(envelope):
    """True when no report may be sent for this message: the null sender.

    A message from ``<>`` is itself a notification (RFC 5321 4.5.5, RFC 3464
    section 4); answering it could start a loop.  The queue logs the failure
    instead (and may tell the postmaster, see ``make_report(to=...)``).
    """
    sender = envelope.get("sender")
    return sender is None or str(sender).strip().strip("<>").strip() == ""


def dsn_params(report):
    """The envelope ``params`` the spooled report needs, in the spool's format.

    ``{}`` for a 7-bit report; ``{"body": "8BITMIME"}`` when the returned
    original carries 8-bit octets; plus ``"smtputf8": True`` when the report's
    own header section does (a ``To:`` naming an internationalised sender).
    """
    if report.isascii():
        return {}
    params = {"body": "8BITMIME"}
    end = report.find(b"\r\n\r\n")
    head = report if end < 0 else report[:end]
    if not head.isascii():
        params["smtputf8"] = True
    return params


# --------------------------------------------------------------------------
# Sanitising


def _text(value):
    """Any value as one line of text: controls become spaces, runs of white space one."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = _SURROGATE_RE.sub("\ufffd", str(value))   # undecodable octets show as such
    return " ".join(_CONTROL_RE.sub(" ", value).split())


def _ascii(value):
    """One line of printable ASCII: anything else becomes ``?``."""
    return _NON_PRINTABLE_RE.sub("?", _text(value))


def _no_controls(value):
    """An address with control characters removed (spaces inside quotes stay)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return _CONTROL_RE.sub("", str(value)).strip()


def _address(value):
    """An address for a header or the text part: no controls, at most 900 octets of UTF-8."""
    a = _no_controls(value)
    raw = a.encode("utf-8")
    if len(raw) > _MAX_WORD:
        a = raw[:_MAX_WORD].decode("utf-8", "ignore")
    return a


def _hostname(value, default="localhost"):
    host = re.sub(r"[^A-Za-z0-9.\-_\[\]:]", "", _ascii(value))[:255]
    return host or default


def _utf8_xtext(address):
    """RFC 6533 utf-8-addr-xtext: QCHARs as they are, the rest as ``\\x{HEX}``."""
    out = []
    size = 0
    for c in address:
        piece = c if ("!" <= c <= "~" and c not in "+=\\") else f"\\x{{{ord(c):02X}}}"
        size += len(piece)
        if size > _MAX_WORD:
            break
        out.append(piece)
    return "".join(out)


def _typed_address(address):
    """``rfc822; addr`` for an ASCII address, else RFC 6533 ``utf-8; xtext``."""
    a = _no_controls(address)
    if a.isascii():
        return "rfc822", a[:_MAX_WORD]
    return "utf-8", _utf8_xtext(a)


def _original_recipient(orcpt):
    """The Original-Recipient value from an ORCPT (type, address), or None."""
    if not orcpt or len(orcpt) != 2:
        return None
    atype, addr = (_no_controls(x) for x in orcpt)
    if not _KEYWORD_RE.match(atype) or not addr:
        return None
    atype = atype.lower()
    if atype == "utf-8":
        # Kept as the client sent it (utf-8-addr-xtext or -unitext): decode the
        # escapes, then write the 7-bit form.
        def unescape(m):
            cp = int(m.group(1), 16)
            return chr(cp) if cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "?"
        return "utf-8;" + _utf8_xtext(_no_controls(_EMBEDDED_RE.sub(unescape, addr)))
    if atype == "rfc822":
        t, a = _typed_address(addr)
        return f"{t};{a}"
    return f"{atype};{_ascii(addr)[:_MAX_WORD]}"


def _diagnostic(value):
    """``(type, text)`` for Diagnostic-Code, ASCII, one line, bounded; or None."""
    if isinstance(value, (str, bytes)):
        value = value[:4 * _MAX_DIAGNOSTIC]   # bound the work; the rest is cut below anyway
    text = _text(value)
    if not text:
        return None
    dtype = "smtp"
    m = _DIAG_TYPE_RE.match(text)
    if m:
        dtype = m.group(1)
        dtype = "smtp" if dtype.lower() == "smtp" else dtype
        text = text[m.end():]
    text = _ascii(text)
    if len(text) > _MAX_DIAGNOSTIC:
        text = text[:_MAX_DIAGNOSTIC - 3] + "..."
    return dtype, text


def _date(ts):
    """RFC 5322 date-time in UTC (``+0000``), or None for a missing or bad value."""
    try:
        ts = float(ts)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(ts):
        return None
    try:
        return format_datetime(datetime.fromtimestamp(ts, tz=timezone.utc))
    except (OverflowError, OSError, ValueError):
        return None


def _field(name, value):
    """A header or status field, folded at spaces; every line at most 998 octets.

    ``value`` must already be clean (no CR, LF or other controls).  Words longer
    than ``_CHOP`` are cut into pieces, which unfold with a space between; the
    callers bound addresses (``_MAX_WORD``) so that only a diagnostic ever is.
    """
    words = []
    for w in value.split(" "):
        while len(w.encode("utf-8")) > _CHOP:
            cut = w.encode("utf-8")[:_CHOP].decode("utf-8", "ignore")
            words.append(cut)
            w = w[len(cut):]
        words.append(w)
    lines = []
    line = f"{name}:"
    first = True
    for w in words:
        if not first and w and len(line) + 1 + len(w) > _FOLD_AT:
            lines.append(line)
            line = " " + w
        else:
            line += " " + w
        first = False
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


# --------------------------------------------------------------------------
# The original message


def _split_original(original):
    """``(header section, whole)`` with line ends made CRLF.

    The header section runs to the first empty line and ends with the CRLF of
    its last field (empty when the message starts with an empty line).
    """
    whole = _LINE_END_RE.sub(b"\r\n", bytes(original))
    if whole.startswith(b"\r\n"):
        return b"", whole
    end = whole.find(b"\r\n\r\n")
    if end < 0:
        head = whole if whole.endswith(b"\r\n") or not whole else whole + b"\r\n"
    else:
        head = whole[:end + 2]
    return head, whole


def _fit(lines_bytes):
    """Whether bytes may go into the report unchanged: no NUL, no line over 998."""
    if b"\x00" in lines_bytes:
        return False
    return all(len(line) <= MAX_LINE for line in lines_bytes.split(b"\r\n"))


def _safe_headers(head, limit):
    """The header section made fit: lines cut at 998, NULs dropped, size bounded."""
    changed = False
    if b"\x00" in head:
        head = head.replace(b"\x00", b"")
        changed = True
    if not _fit(head):
        head = b"\r\n".join(line[:MAX_LINE] for line in head.split(b"\r\n"))
        changed = True
    if len(head) > limit:
        cut = head.rfind(b"\r\n", 0, limit + 1)
        head = head[:cut + 2] if cut >= 0 else b""
        changed = True
    return head, changed


# --------------------------------------------------------------------------
# The report


def _describe(st):
    code = st.status
    detail = _DETAIL.get(code.split(".", 1)[1]) or _SUBJECT.get(code.split(".")[1], "status")
    return f"{detail} (status {code})"


def _recipient_paragraph(st, display, diag):
    who = f"<{display}>"
    if st.action in ("failed", "delayed"):
        if diag:
            # Only a server's own reply is what a host "said"; an X-Mailsys
            # diagnostic is ours (a lost connection, say) and names the host itself.
            remote = _hostname(st.remote_mta, "") if diag[0] == "smtp" else ""
            said = f"host {remote} said: " if remote else ""
            text = f"{who}: {said}{diag[1]} (status {st.status})"
        else:
            text = f"{who}: {_describe(st)}"
        if st.action == "delayed" and st.will_retry_until is not None:
            until = _date(st.will_retry_until)
            if until:
                text += f"; delivery will be retried until {until}"
    elif st.action == "delivered":
        remote = _hostname(st.remote_mta, "")
        via = f" via {remote}" if remote else ""
        text = f"{who}: delivered{via}"
        if diag:
            text += f" ({diag[1]})"
    elif st.action == "relayed":
        remote = _hostname(st.remote_mta, "")
        via = f" to {remote}" if remote else ""
        text = (f"{who}: relayed{via}, a system that does not send delivery "
                f"notifications; no further report will follow for this recipient")
    else:  # expanded
        text = (f"{who}: delivered to an alias or list and passed on to its members; "
                f"they are not reported on one by one")
    return textwrap.fill(text, width=76, subsequent_indent="    ",
                         break_long_words=True, break_on_hyphens=False)


def _human_part(kind, host, queue_id, sender, arrival, postmaster, statuses, attach_note):
    out = [f"This is the mail delivery system at {host}.", ""]
    if kind == "failure":
        out += textwrap.wrap(
            "Your message could not be delivered to one or more of its recipients. "
            "They are listed below with the reason. This is a permanent result: "
            "the mail system will not try these recipients again.", 76)
    elif kind == "delay":
        untils = [s.will_retry_until for s in statuses if s.will_retry_until is not None]
        until = _date(max(untils)) if untils else None
        text = ("Your message has not yet been delivered to the recipients listed below. "
                "The mail system keeps trying; you do not need to send it again.")
        if until:
            text += (f" If it still cannot be delivered by {until}, it will be returned "
                     f"to you.")
        out += textwrap.wrap(text, 76)
    else:
        out += textwrap.wrap(
            "Your message was delivered to the recipients listed below. You receive "
            "this report because a delivery notification was requested for them.", 76)
    out += [""]
    out += textwrap.wrap(f"If you need help, please write to {postmaster} and include "
                         f"this report.", 76)
    out += ["", "Recipients:", ""]
    for st, display, diag in _rendered(statuses):
        out += _recipient_paragraph(st, display, diag).split("\n")
        out.append("")
    out += ["Message details:", f"    Queue ID: {queue_id}", f"    Sender:   <{sender}>"]
    if arrival:
        out.append(f"    Arrived:  {arrival}")
    out += [""]
    out += textwrap.wrap(attach_note, 76)
    text = "\n".join(out) + "\n"
    if text.isascii():
        body = text.replace("\n", "\r\n").encode("ascii")
        head = ("Content-Description: Notification\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "Content-Transfer-Encoding: 7bit\r\n")
    else:
        body = _quoted_printable(text)
        head = ("Content-Description: Notification\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n")
    return head.encode("ascii") + b"\r\n" + body


def _quoted_printable(text):
    """RFC 2045 6.7 quoted-printable of ``text`` (LF line ends in), CRLF out."""
    out = []
    for line in text.split("\n"):
        enc = []
        for b in line.encode("utf-8"):
            if (33 <= b <= 126 and b != 61) or b == 32:
                enc.append(chr(b))
            else:
                enc.append(f"={b:02X}")
        if enc and enc[-1] == " ":
            enc[-1] = "=20"
        # Soft line breaks: at most 76 characters, never splitting an =XX.
        cur = ""
        for piece in enc:
            if len(cur) + len(piece) > 75:
                out.append(cur + "=")
                cur = ""
            cur += piece
        out.append(cur)
    return "\r\n".join(out).encode("ascii")


def _rendered(statuses):
    """Pairs each status with its display address and cleaned diagnostic."""
    for st in statuses:
        display = _address(st.rcpt)
        yield st, display, _diagnostic(st.diagnostic)


def _status_part(host, queue_id, envelope, arrival, statuses):
    fields = []
    envid = _ascii((envelope.get("params") or {}).get("envid"))
    if envid:
        fields.append(_field("Original-Envelope-Id", envid))
    fields.append(_field("Reporting-MTA", f"dns; {host}"))
    if arrival:
        fields.append(_field("Arrival-Date", arrival))
    fields.append(_field("X-Mailsys-Queue-ID", queue_id))
    stype, saddr = _typed_address(envelope.get("sender") or "")
    if saddr:
        fields.append(_field("X-Mailsys-Sender", f"{stype}; {saddr}"))
    blocks = ["".join(fields)]
    for st in statuses:
        f = []
        orig = _original_recipient(st.orcpt)
        if orig:
            f.append(_field("Original-Recipient", orig))
        rtype, raddr = _typed_address(st.rcpt)
        f.append(_field("Final-Recipient", f"{rtype}; {raddr}"))
        f.append(_field("Action", st.action))
        f.append(_field("Status", st.status))
        if st.remote_mta:
            remote = _hostname(st.remote_mta, "")
            if remote:
                f.append(_field("Remote-MTA", f"dns; {remote}"))
        diag = _diagnostic(st.diagnostic)
        if diag:
            f.append(_field("Diagnostic-Code", f"{diag[0]}; {diag[1]}"))
        last = _date(st.last_attempt)
        if last:
            f.append(_field("Last-Attempt-Date", last))
        if st.action == "delayed":
            until = _date(st.will_retry_until)
            if until:
                f.append(_field("Will-Retry-Until", until))
        blocks.append("".join(f))
    body = "\r\n".join(blocks).encode("ascii")
    head = (b"Content-Description: Delivery report\r\n"
            b"Content-Type: message/delivery-status\r\n")
    return head + b"\r\n" + body


def _original_part(kind, envelope, original, max_original):
    """The third part and the sentence the text part says about it."""
    ret = str((envelope.get("params") or {}).get("ret") or "").upper()
    utf8 = bool((envelope.get("params") or {}).get("smtputf8"))
    head, whole = _split_original(original)
    full = kind == "failure" and ret != "HDRS"
    note = None
    if full:
        if len(whole) > max_original:
            full = False
            note = (f"The original message was larger than {max_original} bytes, so only "
                    f"its header section is attached.")
        elif not _fit(whole):
            full = False
            note = ("The original message contains lines too long or characters not "
                    "allowed in mail, so only its header section is attached.")
    if full:
        content = whole
        ctype = "message/global" if utf8 and not head.isascii() else "message/rfc822"
        desc = "Undelivered message"
        note = "The original message is attached."
    else:
        content, changed = _safe_headers(head, max(max_original, 64 * 1024))
        ctype = "message/global-headers" if utf8 and not content.isascii() \
            else "text/rfc822-headers"
        desc = "Undelivered message headers" if kind == "failure" else "Message headers"
        if note is None:
            note = "The header section of the original message is attached."
        if changed:
            note += " Some of it had to be shortened or cleaned to fit in this report."
    cte = "7bit" if content.isascii() else "8bit"
    part = (f"Content-Description: {desc}\r\nContent-Type: {ctype}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode("ascii") + content
    return part, note


def _boundary(queue_id, body_parts):
    """A boundary that occurs in none of the parts (RFC 2046 5.1.1)."""
    qid = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:24] or "dsn"
    while True:
        b = f"=_{qid}.{secrets.token_hex(10)}"
        token = b.encode("ascii")
        if not any(token in p for p in body_parts):
            return b


def make_report(*, reporting_mta, queue_id, envelope, original, statuses, kind, now,
                postmaster="postmaster", max_original=MAX_ORIGINAL, to=None):
    """Compose one delivery status notification as CRLF bytes (headers and body).

    ``statuses`` are the recipients this report is about (the caller has
    applied ``wants()``); ``kind`` is ``"failure"``, ``"delay"`` or
    ``"success"``.  The report is addressed to ``envelope["sender"]`` unless
    ``to`` names someone else (the postmaster, for a failed message from
    ``<>``), and must be sent from ``<>``.  ``max_original`` bounds the
    original returned whole; see ``MAX_ORIGINAL``.

    Raises ValueError for a wrong ``kind``, an unknown action, a malformed
    status code or an empty ``statuses``: programming errors.  Nothing in the
    envelope, the original or the diagnostics makes it raise.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown report kind: {kind!r}")
    statuses = list(statuses)
    if not statuses:
        raise ValueError("a report needs at least one recipient")
    for st in statuses:
        if st.action not in ACTIONS:
            raise ValueError(f"unknown action: {st.action!r}")
        if not _STATUS_RE.match(str(st.status)):
            raise ValueError(f"malformed status code: {st.status!r}")

    host = _hostname(reporting_mta)
    qid = re.sub(r"[^A-Za-z0-9]", "", _ascii(queue_id))[:64] or "unknown"
    sender = _address(envelope.get("sender") or "")
    rcpt_to = sender if to is None else _address(to)
    arrival = _date(envelope.get("arrival"))
    pm = _address(postmaster) or "postmaster"

    part3, note = _original_part(kind, envelope, original, max_original)
    part2 = _status_part(host, qid, envelope, arrival, statuses)
    part1 = _human_part(kind, host, qid, sender, arrival, pm, statuses, note)
    boundary = _boundary(qid, (part1, part2, part3))
    delim = b"\r\n--" + boundary.encode("ascii")

    stamp = hashlib.sha256(f"{now!r}:{secrets.token_hex(8)}".encode()).hexdigest()[:12]
    date = _date(now) or _date(0)
    headers = "".join([
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
        _field("To", f"<{rcpt_to}>"),
        _field("Subject", _SUBJECTS[kind]),
        _field("Date", date),
        _field("Message-ID", f"<{qid}.dsn-{kind}.{stamp}@{host}>"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f"\tboundary=\"{boundary}\"\r\n",
    ])
    if not part3.isascii():
        headers += "Content-Transfer-Encoding: 8bit\r\n"
    preamble = b"This is a MIME-encapsulated delivery status notification."
    return (headers.encode("utf-8") + b"\r\n" + preamble
            + delim + b"\r\n" + part1
            + delim + b"\r\n" + part2
            + delim + b"\r\n" + part3
            + delim + b"--\r\n")
