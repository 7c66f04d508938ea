"""The store interface and the one place where a mailbox path is made.

A mailbox path is derived only from a known account's canonical address, and
every component is checked again here (no separator, no NUL, no leading dot,
bounded length) and the result confirmed to lie under ``mailbox.root``: the
raw local part a client sent never becomes a path.
"""
import os

from zope.interface import Attribute, Interface


class IMailStore(Interface):
    """Where delivered mail lives.  Implementations: Maildir, mbox, memory."""

    kind = Attribute("'maildir', 'mbox' or 'memory'")

    def deliver(location, prefix, message, quota, sender=None, when=None):
        """Store ``prefix + message`` (LF line ends) durably.

        ``prefix`` is bytes; ``message`` is bytes or a :class:`Body` (what the
        MDA hands over: the chunks as they arrived, never joined by the MDA).

        Both arrive with the LF line ends the stores keep (qmail, Postfix's
        virtual(8) and Dovecot do the same): the MDA's DATA reader converts the
        body as it arrives, so no store walks a message again to convert it.

        ``location`` comes from :func:`mailbox_location`; ``quota`` is bytes (0 =
        unlimited); ``sender`` and ``when`` feed mbox's ``From`` line.
        Returns a mailsys.delivery Outcome; never raises for disk
        trouble (that is a TempFail) and never leaves a partial message visible.
        """

    def deliver_many(items, log=None, keys=None):
        """``deliver`` for a list of ``(location, prefix, message, quota, sender,
        when)`` tuples; one Outcome each, in order.  Stores make a batch durable
        together, which is what makes concurrent deliveries cheap.

        With a delivery log (mailsys.mda.dedupe.DeliveryLog) and ``keys[i] =
        (queue id, recipient)``, item i's whereabouts are written to the log
        before the copy becomes visible, durable no later than the copy."""

    def holds(location, where):
        """True if the mailbox holds the copy a delivery log record describes
        (``where`` as this store logged it); False when in doubt."""

    def size(location):
        """Bytes currently stored in the mailbox (0 if it does not exist yet)."""

    def messages(location):
        """The stored messages' bytes, oldest first (for tests and tools)."""


class Body:
    """A message as the MDA received it: its chunks with LF line ends, as the
    DATA reader produced them, and its size with CRLF line ends.

    Why not one ``bytes``: for a 1 MiB message, joining the chunks and counting
    its line ends (for Maildir's ``W=``) were two more passes over the message
    in Python, about 8% of the MDA's time (docs/performance.rst).  The reader
    already knows the CRLF size, so the line ends are ``crlf_size - size``
    (every LF came from a CRLF: a bare one gets the message refused before it
    reaches a store), and Maildir hands the chunks to ``writev`` as they are.
    A store that needs one string asks ``bytes(body)``: joined once, kept.
    """

    __slots__ = ("chunks", "size", "crlf_size")

    def __init__(self, chunks, crlf_size):
        self.chunks = chunks
        self.size = sum(map(len, chunks))
        self.crlf_size = crlf_size

    @property
    def line_ends(self):
        return self.crlf_size - self.size

    def __len__(self):
        return self.size

    def __bytes__(self):
        if len(self.chunks) != 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]

    def head(self, n):
        """The first ``n`` bytes (or all, if shorter) without joining the rest."""
        out, have = [], 0
        for chunk in self.chunks:
            if have >= n:
                break
            out.append(chunk)
            have += len(chunk)
        return b"".join(out)[:n]


def body_parts(message):
    """``(chunks, size, line ends)`` of a message given as bytes or a :class:`Body`."""
    if isinstance(message, Body):
        return message.chunks, message.size, message.line_ends
    return (message,), len(message), message.count(b"\n")


class UnsafeMailbox(Exception):
    pass


MAX_COMPONENT = 255


def _check_component(text, what):
    if (not text or len(text.encode("utf-8")) > MAX_COMPONENT or text.startswith(".")
            or "/" in text or "\\" in text or "\x00" in text or text != text.strip()):
        raise UnsafeMailbox(f"unsafe {what} for a mailbox path: {text!r}")
    return text


def mailbox_location(root, address, store):
    """``ROOT/<domain>/<local>/Maildir`` or ``ROOT/<domain>/<local>/mbox`` for an account."""
    local, _, domain = address.rpartition("@")
    local = _check_component(local.lower(), "local part")
    domain = _check_component(domain.lower(), "domain")
    root = os.path.abspath(root)
    home = os.path.join(root, domain, local)
    leaf = "Maildir" if store == "maildir" else "mbox"
    path = os.path.normpath(os.path.join(home, leaf))
    if os.path.commonpath([root, path]) != root or path == root:
        raise UnsafeMailbox(f"mailbox path escapes the root: {path!r}")
    return path


def make_private_dirs(path, root):
    """Create ``path`` and every missing directory between ``root`` and it with
    mode 0700 (``os.makedirs`` gives the mode to the last one only).

    Returns the directories whose entries changed -- the parent of every
    directory that was missing when looked at, created here or by another
    process meanwhile -- for a store to flush before it acknowledges anything
    inside: a new directory's name is an entry of its parent, and a mailbox
    whose directory a power failure loses takes the messages acknowledged in
    it along."""
    below = []
    current = path
    root = os.path.abspath(root)
    while current != root and not os.path.isdir(current):
        below.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    above = []          # the root itself when it is missing, and what it lacks above
    d = current
    while not os.path.isdir(d):
        above.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    os.makedirs(current, mode=0o700, exist_ok=True)
    for directory in reversed(below):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    return sorted({os.path.dirname(d) for d in below + above})
