"""SMTP replies as values.

Replies are data, not strings scattered through the protocol: policy code returns
a :class:`Reply`, the wire code renders it.  Every reply after the greeting carries
an RFC 3463 enhanced status code (RFC 2034), so the constructor insists on one
unless the caller says there is none (the banner and the EHLO response).
"""


class Reply:
    """One (possibly multi-line) SMTP reply."""

    __slots__ = ("code", "status", "lines", "_wire")

    def __init__(self, code, status, *lines):
        if not lines:
            raise ValueError("a reply needs text")
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
        self.code = int(code)
        self.status = status
        self.lines = tuple(lines)
        self._wire = None

    @property
    def text(self):
        return " ".join(self.lines)

    @property
    def is_positive(self):
        return self.code < 400

    @property
    def is_permanent(self):
        return self.code >= 500

    def with_text(self, *lines):
        return Reply(self.code, self.status, *lines)

    def to_bytes(self):
        """The reply as it goes on the wire: ``CODE-x.y.z text`` lines, CRLF ended."""
        if self._wire is None:
            prefix = str(self.code)
            status = f"{self.status} " if self.status else ""
            last = len(self.lines) - 1
            out = []
            for i, line in enumerate(self.lines):
                sep = " " if i == last else "-"
                # The enhanced code goes on every line (RFC 2034 section 4), except
                # in replies that have none (banner, EHLO keywords).
                out.append(f"{prefix}{sep}{status}{line}\r\n")
            self._wire = "".join(out).encode("utf-8")
        return self._wire

    def __str__(self):
        return f"{self.code} {self.status + ' ' if self.status else ''}{self.text}"

    def __repr__(self):
        return f"Reply({self.code}, {self.status!r}, {', '.join(map(repr, self.lines))})"

    def __eq__(self, other):
        return isinstance(other, Reply) and (self.code, self.status, self.lines) == (
            other.code, other.status, other.lines)

    def __hash__(self):
        return hash((self.code, self.status, self.lines))


class PeerReply(Reply):
    """A reply as a peer sent it, parsed off the wire by our SMTP or LMTP client.

    Why a type of its own: a delivery report must tell a reply some server
    gave (``Diagnostic-Code: smtp; ...``, RFC 3464 2.3.6) from one mailsys
    made up itself, for a refused connection, a DNS failure or a destination
    taken as down (``X-Mailsys; ...``).  Every courier already passes the
    reply on in its TempFail/PermFail/Delivered; only the parser makes this
    type, and :meth:`with_text` (new words) gives a plain :class:`Reply`."""

    __slots__ = ()


# Replies used in more than one place.  Text follows Postfix where operators know it.
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
BDAT_THEN_DATA = Reply(503, "5.5.1", "Error: DATA after BDAT in one transaction")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BAD_BYTES = Reply(500, "5.5.2", "Error: bad characters in command")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> in message; use <CR><LF> line endings")
MAIL_LOOP = Reply(554, "5.4.6", "Error: too many hops")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown in local recipient table")
VRFY_REPLY = Reply(252, "2.0.0", "Send mail to find out; the address is not verified")
EXPN_DISABLED = Reply(502, "5.5.1", "Error: command not implemented")
NOOP_OK = Reply(250, "2.0.0", "Ok")
IO_ERROR = Reply(451, "4.3.0", "Error: local I/O error, try again later")
NO_SPACE = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
