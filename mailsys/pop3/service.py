"""POP3 policy: who may log in, which mailbox they get, and the listeners' factory.

The protocol (mailsys.pop3.server) asks a :class:`POP3Session` per connection.
Logins go through the same twisted.cred portal and the same per-IP
:class:`~mailsys.auth.FailureThrottle` as SMTP AUTH on the submission roles, so
guesses spread over both protocols are slowed alike.  A mailbox is derived
only from the account's canonical address (mailsys.mda.store.mailbox_location),
never from what the client typed, and is opened under the cross-process
:class:`~mailsys.pop3.mailbox.MailboxLock`; the blocking work (locking,
listing, the QUIT commit) runs in the reactor's thread pool.
"""
import os
import re

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import threads
from twisted.internet.protocol import ServerFactory

from mailsys.auth import IMailUser
from mailsys.logs import MailLog
from mailsys.mda.store import UnsafeMailbox, mailbox_location, make_private_dirs
from mailsys.pop3.mailbox import MailboxBusy, MailboxError, MailboxLock, MaildirBox, MboxBox
from mailsys.pop3.server import AUTH_FAILED, POP3Server, Refusal

log = MailLog("mailsys.pop3")

IN_USE = Refusal("[IN-USE] Mailbox is locked by another POP3 session")
# RFC 2449 section 8.1.1: [IN-USE] is also for a maildrop in use "for some other
# reason"; another program (an MDA, Dovecot, mutt) held the mbox's lock too long.
IN_USE_OTHER = Refusal("[IN-USE] Mailbox is locked by another program, try again later")
TEMP = Refusal("[SYS/TEMP] Cannot open the mailbox now, try again later")
PERM = Refusal("[SYS/PERM] This account's mailbox cannot be opened; ask the postmaster")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text, limit=100):
    """A client-supplied name made safe for one log line."""
    return _UNPRINTABLE.sub("?", text[:limit])


class Maildrop:
    """One logged-in session's view of its mailbox, as the protocol uses it."""

    def __init__(self, address, box, lock, entries, run):
        self.address = address
        self.box = box
        self.lock = lock
        self.entries = entries
        self.unquote = box.unquote
        self._run = run

    def open(self, entry):
        """Deferred of a reader: an mbox message is checked against the scan
        first, a blocking hashing pass."""
        return self._run(self.box.open, entry)

    def commit(self, deleted, seen):
        """Deferred of the number of deletions not done."""
        return self._run(self.box.commit, deleted, seen)

    def close(self):
        try:
            self.box.close()
        finally:
            self.lock.release()


def open_mailbox(root, address, kind):
    """Blocking: lock and list the account's mailbox; None when it is in use."""
    location = mailbox_location(root, address, kind)
    home = os.path.dirname(location)
    make_private_dirs(home, root)
    lock = MailboxLock(home)
    if not lock.acquire():
        return None
    try:
        box = MboxBox(location) if kind == "mbox" else MaildirBox(location)
        entries = box.load()
    except BaseException:
        lock.release()
        raise
    return box, lock, entries


class POP3Session:
    """The backend of one connection (see mailsys.pop3.server for the contract)."""

    def __init__(self, host, client, run):
        self.host = host
        self.client = client
        self.run = run
        self.admitted = False
        self.user = None

    def connected(self, proto):
        if not self.host.limiter.acquire(self.client.ip):
            log.info(f"pop3: reject: connect from {self.client}: too many connections",
                     client=self.client.label)
            return "[SYS/TEMP] Too many connections, try again later"
        self.admitted = True
        log.info(f"pop3: connect from {self.client}", client=self.client.label)
        return None

    def disconnected(self, proto):
        if self.admitted:
            self.admitted = False
            self.host.limiter.release(self.client.ip)
            user = f" user=<{self.user}>" if self.user else ""
            log.info(f"pop3: disconnect from {self.client}{user} {proto.stats}",
                     client=self.client.label, user=self.user, stats=str(proto.stats))

    def tls_context(self, proto):
        return self.host.tls

    def login(self, proto, user, password, method):
        ip = self.client.ip
        throttle = self.host.auth_throttle
        creds = credentials.UsernamePassword(user, password)

        def check(_):
            return self.host.portal.login(creds, None, IMailUser)

        def ok(result):
            _, address, _ = result
            throttle.succeeded(ip)
            return self._open(address, method)

        def failed(f):
            f.trap(UnauthorizedLogin, UnhandledCredentials)
            throttle.failed(ip)
            log.info(f"pop3: warning: {self.client.label}: authentication failed, "
                     f"method={method}, user=<{_printable(user)}>",
                     client=self.client.label, method=method, user=_printable(user))
            return Refusal(AUTH_FAILED, auth_failure=True)

        d = throttle.wait(ip)
        d.addCallback(check)
        d.addCallbacks(ok, failed)
        return d

    def _open(self, address, method):
        config = self.host.config
        account = self.host.accounts.user(address)
        if account is None:   # removed between the check and now
            return Refusal(AUTH_FAILED, auth_failure=True)
        kind = account.store or config.mailbox.default_store
        try:
            mailbox_location(config.mailbox.root, account.address, kind)
        except UnsafeMailbox as e:
            log.error(f"pop3: {self.client.label}: {e}", client=self.client.label)
            return PERM
        d = self.run(open_mailbox, config.mailbox.root, account.address, kind)

        def opened(result):
            if result is None:
                log.info(f"pop3: {self.client.label}: user=<{account.address}>: mailbox in use",
                         client=self.client.label, user=account.address)
                return IN_USE
            box, lock, entries = result
            self.user = account.address
            log.info(f"pop3: {self.client.label}: login user=<{account.address}>, method={method}, "
                     f"messages={len(entries)}",
                     client=self.client.label, user=account.address, method=method,
                     messages=len(entries))
            return Maildrop(account.address, box, lock, entries, self.run)

        def failed(f):
            if f.check(MailboxError):   # expected: one line naming the cause
                log.warn(f"pop3: warning: {self.client.label}: user=<{account.address}>: "
                         f"cannot open the mailbox: {f.value}",
                         client=self.client.label, user=account.address, error=str(f.value))
                return IN_USE_OTHER if f.check(MailboxBusy) else TEMP
            log.failure(f"pop3: {self.client.label}: cannot open the mailbox of "
                        f"{account.address}", f, client=self.client.label)
            return TEMP

        d.addCallbacks(opened, failed)
        return d


class POP3Factory(ServerFactory):
    """One :class:`POP3Server` and :class:`POP3Session` per connection of a role
    (``pop3``: STLS offered when a certificate is loaded; ``pop3s``: already in TLS)."""

    noisy = False

    def __init__(self, host, role, run=None):
        self.host = host
        self.role = role
        if run is None:
            reactor = host.reactor

            def run(f, *args):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self.run = run

    def buildProtocol(self, addr):
        from mailsys.receive import ClientInfo

        client = ClientInfo.from_peer(addr, self.role)
        if client.ip is not None:
            name = self.host.rdns.cached(client.ip)
            if name:
                client.set_name(name)
        session = POP3Session(self.host, client, self.run)
        tls = self.host.tls
        proto = POP3Server(
            session, self.host.config.server.hostname, clock=self.host.clock,
            tls_available=tls is not None and tls.available and self.role == "pop3",
            tls=self.role == "pop3s", max_auth_failures=self.host.config.limits.auth_failures,
            label=client.label)
        proto.factory = self
        return proto
