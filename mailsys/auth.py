"""Authentication for the submission roles (and POP3): twisted.cred over the users file.

``check_password`` is slow on purpose (Argon2id) and runs in the reactor's
thread pool.  Unknown users go through the same work against a dummy hash
(mailsys.accounts), so the reply time does not reveal whether an account exists.
Failures are also remembered per client IP across connections: after a few,
every further attempt from that IP waits before it is even checked, doubling
up to a ceiling, whatever its outcome, so a guesser gains nothing from timing.
"""
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from zope.interface import Interface, implementer


class IMailUser(Interface):
    """Avatar interface: the authenticated account's canonical address."""


@implementer(ICredentialsChecker)
class AccountsChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, accounts, reactor):
        self.accounts = accounts
        self.reactor = reactor

    def requestAvatarId(self, creds):
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._check, creds.username, creds.password)
        return d

    def _check(self, username, password):
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if self.accounts.check_password(username, password):
            user = self.accounts.user(username)
            return user.address if user is not None else username
        raise error.UnauthorizedLogin()


@implementer(portal.IRealm)
class MailRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailUser not in interfaces:
            raise NotImplementedError()
        return IMailUser, avatarId, lambda: None


def make_portal(accounts, reactor):
    return portal.Portal(MailRealm(), [AccountsChecker(accounts, reactor)])


class FailureThrottle:
    """Slows repeated authentication failures from one IP across connections."""

    def __init__(self, clock, free=3, base=1.0, ceiling=30.0, window=900.0, max_entries=50000):
        self.clock = clock
        self.free, self.base, self.ceiling, self.window = free, base, ceiling, window
        self.max_entries = max_entries
        self._failures = {}   # ip -> (count, last failure time)

    def delay(self, ip):
        hit = self._failures.get(ip)
        if hit is None:
            return 0.0
        count, last = hit
        if self.clock.seconds() - last > self.window:
            del self._failures[ip]
            return 0.0
        if count < self.free:
            return 0.0
        return min(self.base * 2 ** (count - self.free), self.ceiling)

    def failed(self, ip):
        if len(self._failures) >= self.max_entries:
            self._failures.clear()
        count, _ = self._failures.get(ip, (0, 0.0))
        self._failures[ip] = (count + 1, self.clock.seconds())

    def succeeded(self, ip):
        self._failures.pop(ip, None)

    def wait(self, ip):
        """A Deferred that fires after this IP's current penalty."""
        seconds = self.delay(ip)
        if not seconds:
            return defer.succeed(None)
        return _sleep(self.clock, seconds)


def _sleep(clock, seconds):
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
