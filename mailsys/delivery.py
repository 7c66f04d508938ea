"""The one delivery contract: every store and courier answers with one of these.

The queue (and the LMTP server, per recipient) never needs to know how a
delivery happened, only whether it is done, worth retrying, or hopeless, and
the reply that says why.  A recipient is recorded as delivered only on
:class:`Delivered`; anything unexpected is a :class:`TempFail`, never success.
"""
from mailsys.smtp.reply import PeerReply, Reply


class Outcome:
    """``relay`` optionally names where the attempt went (``HOST[IP]:PORT``), for
    the log line and the DSN's Remote-MTA; a courier that knows sets it."""
    __slots__ = ("reply", "relay")
    delivered = False
    permanent = False

    def __init__(self, reply, relay=None):
        self.reply = reply
        self.relay = relay

    @property
    def from_peer(self):
        """Whether ``reply`` is what a server said (mailsys.smtp.reply.PeerReply),
        not one made up here (connection refused, DNS trouble, a destination
        taken as down, no courier): the report's ``smtp;`` or ``X-Mailsys;``."""
        return isinstance(self.reply, PeerReply)

    def __repr__(self):
        return f"{type(self).__name__}({self.reply})"

    def __eq__(self, other):
        return type(self) is type(other) and self.reply == other.reply


# What a success notice (RFC 3464 Action) says of a Delivered recipient.
DELIVERED = "delivered"     # into a mailbox (our MDA over LMTP)
RELAYED = "relayed"         # handed to a server that does not offer DSN
PASSED_ON = None            # handed to a server that offers DSN, with the NOTIFY
                            # request: that server reports, so we must not (RFC 3461 5.2)
EXPANDED = "expanded"       # an alias of several addresses (RFC 3461 6.2.7.3, RFC 3464 2.3.3)

# How our MDA words a 250 for an alias (mailsys.mda.lmtp), so that the queue's
# LMTP courier can tell the notice's Action; any other 250 is "delivered".
EXPANDED_TEXT = "Ok: expanded to {n} recipients"
ALIAS_QUEUED_TEXT = "Ok: queued as {qid}"


def lmtp_action(reply):
    """The Action of a recipient our MDA answered 250: ``expanded`` for an
    alias of several addresses, ``relayed`` for an alias of one address outside
    our domains (spooled as a new message that asks for no notice, so none
    will follow), ``delivered`` otherwise."""
    text = reply.text
    if text.startswith(_EXPANDED_PREFIX):
        return EXPANDED
    if text.startswith(_ALIAS_QUEUED_PREFIX):
        return RELAYED
    return DELIVERED


_EXPANDED_PREFIX = EXPANDED_TEXT.partition("{")[0]
_ALIAS_QUEUED_PREFIX = ALIAS_QUEUED_TEXT.partition("{")[0]


class Delivered(Outcome):
    """``action``: :data:`DELIVERED`, :data:`RELAYED` or :data:`PASSED_ON`, for the
    queue's success notice (``NOTIFY=SUCCESS``); the courier knows which."""
    __slots__ = ("action",)
    delivered = True

    def __init__(self, reply=None, relay=None, action=DELIVERED):
        super().__init__(reply or Reply(250, "2.0.0", "Ok: delivered"), relay)
        self.action = action


class TempFail(Outcome):
    pass


class PermFail(Outcome):
    permanent = True


def from_os_error(error, what="mailbox"):
    """Disk trouble is temporary: the sender's MTA keeps the message and retries."""
    import errno

    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return TempFail(Reply(452, "4.3.1", f"Insufficient system storage for {what}"))
    return TempFail(Reply(451, "4.3.0", f"Local I/O error writing {what}"))
