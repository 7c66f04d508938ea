"""The remote courier: every recipient outside our local domains.

Policy lives here, the wire in mailsys.couriers.smtp, DNS in mailsys.resolver.

Routing, per recipient domain (first match wins):

1. ``relay.transport``: ``smtp:[host]:port`` (that host, no MX lookup),
   ``smtp:host:port`` (MX lookup of host), ``lmtp:...`` (another mailbox
   server, through the LMTP courier);
2. ``relay.smarthost``, same bracket rule; with ``relay.smarthost_auth`` the
   session must be verified TLS and authenticates;
3. the domain's MX records (mailsys.resolver), port 25.

Sessions are pooled per destination (next hop): a finished session waits up to
:data:`IDLE_TIMEOUT` seconds for the next message to the same destination
(``RSET`` between transactions) and carries at most :data:`MAX_MESSAGES`; at most
:data:`MAX_SESSIONS` run at once per destination, further messages wait their
turn.  When no address of a destination accepted a connection, the
destination is remembered as down for :data:`DEAD_TIME` seconds and mail for it
is deferred at once ("delivery temporarily suspended") instead of waiting for
connection timeouts and holding up the queue.  ``mailsys queue flush`` and
ETRN make the queue call :meth:`RemoteCourier.forget_dead` first, so the attempt
they ask for is a real one (as Postfix's ``postqueue -f`` and ETRN do).
"""
import ipaddress
from collections import deque

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

from mailsys.couriers.lmtp import _ClientFactory, _clean, _Plan
from mailsys.couriers.smtp import RETRY, Refusal, SMTPClientProtocol, TLSPolicy, Transaction
from mailsys.delivery import TempFail
from mailsys.logs import MailLog
from mailsys.resolver import NextHop, dns_lookup
from mailsys.smtp.reply import Reply

log = MailLog("mailsys.courier.remote")

MAX_SESSIONS = 20       # concurrent sessions per destination
MAX_MESSAGES = 100      # transactions per session
IDLE_TIMEOUT = 5        # seconds an idle session waits for more mail
DEAD_TIME = 60          # seconds a destination that refused every connection is skipped
CONNECT_TIMEOUT = 30    # seconds per TCP connection attempt
MAX_RETRIES = 2         # fresh sessions tried when a reused one turns out dead


class CredentialsError(Exception):
    """The smart host credentials file is unusable; the message says how to fix it."""


def read_credentials(path):
    """``(username, password)`` from a ``username:password`` file that only its
    owner may read (no group or other permission bits)."""
    from mailsys.config import smarthost_auth_problem

    problem = smarthost_auth_problem(path)
    if problem:
        raise CredentialsError(f"relay.smarthost_auth: {problem}")
    with open(path, encoding="utf-8") as f:
        line = f.readline().rstrip("\r\n")
    user, _, password = line.partition(":")
    return user, password


def parse_nexthop(text, default_port=25):
    """``host:port``, ``[host]:port``, ``host``, ``[host]`` -> ``(host, port, mx)``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        return host.lower(), port, False
    host, sep, port = text.partition(":")
    return host.lower().rstrip("."), int(port) if sep else default_port, True


class Destination:
    """Where a group of recipients goes, and how."""

    __slots__ = ("key", "kind", "host", "port", "mx", "tls", "auth", "nexthop")

    def __init__(self, key, kind, host=None, port=25, mx=True, tls=None, auth=None, nexthop=None):
        self.key, self.kind, self.host, self.port, self.mx = key, kind, host, port, mx
        self.tls, self.auth, self.nexthop = tls, auth, nexthop


class _Pool:
    """Sessions of one destination."""

    def __init__(self):
        self.active = 0          # sessions open or opening
        self.idle = []           # [(session, timer)]
        self.waiters = deque()
        self.dead_until = 0.0
        self.dead_reply = None

    def wake(self, everyone=False):
        while self.waiters:
            d = self.waiters.popleft()
            d.callback(None)
            if not everyone:
                break


class RemoteCourier:
    """``deliver()`` for recipients outside our domains; see the module docstring.

    ``nexthop`` is a :class:`mailsys.resolver.NextHop`; ``trust_root`` the trust
    for verified TLS (None: the platform's CA bundle); ``connect(hop, protocol)``
    -> Deferred may replace TCP connections (tests).
    """

    name = "none"   # the log's relay= when no connection was made, as Postfix says

    def __init__(self, reactor, *, hostname, nexthop, relay_domains=(), smarthost="",
                 smarthost_auth=None, transport=(), outbound_tls="may", trust_root=None,
                 connect=None, max_sessions=MAX_SESSIONS, max_messages=MAX_MESSAGES,
                 idle_timeout=IDLE_TIMEOUT, dead_time=DEAD_TIME, port=25, lmtp_courier=None):
        self.reactor = reactor
        self.clock = reactor
        self.hostname = hostname
        self.nexthop = nexthop
        self.relay_domains = frozenset(d.lower() for d in relay_domains)
        self.smarthost = smarthost
        self.auth = smarthost_auth
        self.transport = {d.lower(): hop for d, hop in dict(transport).items()}
        self.outbound_tls = outbound_tls
        self.trust_root = trust_root
        self._connect_hook = connect
        self.max_sessions = max_sessions
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self.dead_time = dead_time
        self.port = port
        self._lmtp_courier = lmtp_courier or _make_lmtp
        self._lmtp = {}
        self._pools = {}

    # -- routing ------------------------------------------------------------------------

    def destination(self, domain):
        domain = domain.lower().rstrip(".")
        hop = self.transport.get(domain)
        if hop is not None:
            kind, _, rest = hop.partition(":")
            if kind == "lmtp":
                return Destination(hop, "lmtp", nexthop=rest)
            host, port, mx = parse_nexthop(rest, self.port)
            return Destination(hop, "smtp", host, port, mx, TLSPolicy(self.outbound_tls, self.trust_root))
        if self.smarthost:
            host, port, mx = parse_nexthop(self.smarthost, self.port)
            level = "encrypt" if self.auth else self.outbound_tls
            return Destination("smarthost:" + self.smarthost, "smtp", host, port, mx,
                               TLSPolicy(level, self.trust_root), self.auth)
        return Destination(f"mx:{domain}:{self.port}", "smtp", domain, self.port, True,
                           TLSPolicy(self.outbound_tls, self.trust_root))

    def forget_dead(self, domains=None):
        """Forget that destinations are down: every one (``domains`` None), or
        those that mail for ``domains`` goes to.  Returns the keys forgotten.

        Why: an administrator flushes the queue, and a site sends ETRN, exactly
        when a destination has just come back; within :data:`DEAD_TIME` of its
        last refusal the attempt they ask for would otherwise be deferred again
        without a connection, and pushed further out by the backoff."""
        if domains is None:
            keys = list(self._pools)
        else:
            keys = {self.destination(d).key for d in domains}
        now = self.clock.seconds()
        forgotten = []
        for key in keys:
            pool = self._pools.get(key)
            if pool is None or pool.dead_until <= now:
                continue
            pool.dead_until = 0.0
            pool.dead_reply = None
            forgotten.append(key)
            log.info(f"destination {key}: no longer taken as down (flush)", destination=key)
        return forgotten

    # -- the courier contract -------------------------------------------------------------

    def deliver(self, sender, recipients, message, params=None, *, qid=None, redelivery=False):
        """Deferred of one Outcome per recipient, in order; it never fails."""
        try:
            recipients = list(recipients)
            plan = _Plan(sender, recipients, params)
            message = bytes(message)
        except Exception as e:
            log.failure("remote courier: bad delivery request")
            fail = TempFail(Reply(451, "4.3.0", _clean(f"remote courier error: {type(e).__name__}")))
            return defer.succeed([fail] * len(recipients))
        groups = {}
        for i, (address, _) in enumerate(plan.unique):
            dest = self.destination(address.rpartition("@")[2])
            groups.setdefault(dest.key, (dest, []))[1].append(i)
        outcomes = [None] * len(plan.unique)
        waits = []
        for dest, indexes in groups.values():
            d = defer.maybeDeferred(self._deliver_group, dest, indexes, plan, message, qid)

            def store(result, indexes=indexes):
                for i, o in zip(indexes, result):
                    outcomes[i] = o

            def broken(failure, indexes=indexes):
                log.failure("remote courier error", failure)
                for i in indexes:
                    outcomes[i] = TempFail(Reply(451, "4.3.0", "remote courier error, see the log"))

            waits.append(d.addCallbacks(store, broken))
        done = defer.gatherResults(waits, consumeErrors=True)
        return done.addBoth(lambda _: plan.expand(
            [o or TempFail(Reply(451, "4.3.0", "remote courier error")) for o in outcomes]))

    @defer.inlineCallbacks
    def _deliver_group(self, dest, indexes, plan, message, qid):
        recipients = [plan.unique[i] for i in indexes]
        n = len(recipients)
        if dest.kind == "lmtp":
            courier = self._lmtp.get(dest.nexthop)
            if courier is None:
                try:
                    courier = self._lmtp[dest.nexthop] = self._lmtp_courier(
                        self.reactor, dest.nexthop, self.hostname)
                except ValueError as e:
                    return [TempFail(Reply(451, "4.3.5", _clean(
                        f"bad transport lmtp:{dest.nexthop}: {e}")))] * n
            result = yield courier.deliver(plan.sender, recipients, message, plan.params, qid=qid)
            return result
        pool = self._pools.setdefault(dest.key, _Pool())
        route = None
        retries = 0
        while True:
            if pool.dead_until > self.clock.seconds():
                return [TempFail(pool.dead_reply.with_text(
                    "delivery temporarily suspended: " + pool.dead_reply.text))] * n
            session = self._take_idle(pool)
            if session is None and pool.active < self.max_sessions:
                pool.active += 1
                try:
                    if route is None:
                        route = yield self.nexthop.route(dest.host, dest.port, mx=dest.mx)
                    if route.error is not None:
                        self._release(pool)
                        return [_route_failure(route.error)] * n
                    opened = yield self._open(pool, dest, route, qid)
                except Exception:
                    self._release(pool)
                    raise
                if isinstance(opened, Refusal):
                    self._release(pool)
                    return [opened.outcome] * n
                session = opened
            elif session is None:
                d = defer.Deferred()
                pool.waiters.append(d)
                yield d
                continue
            session.qid = qid
            txn = Transaction(plan.sender, recipients, message, plan.params, qid)
            result = yield session.send(txn)
            self._after_use(pool, session)
            if result is RETRY:
                retries += 1
                if retries <= MAX_RETRIES:
                    continue
                return [TempFail(Reply(451, "4.4.2", f"sessions with {session.relay} keep "
                                                     "failing"), session.relay)] * n
            return result

    # -- sessions ---------------------------------------------------------------------------

    def _take_idle(self, pool):
        while pool.idle:
            session, timer = pool.idle.pop()
            if timer.active():
                timer.cancel()
            if session.usable:
                return session
        return None

    def _after_use(self, pool, session):
        if not session.usable or session.transactions >= self.max_messages:
            session.quit()
            return
        def expire():
            for i, (s, _) in enumerate(pool.idle):
                if s is session:
                    del pool.idle[i]
                    session.quit()
                    return

        timer = self.clock.callLater(self.idle_timeout, expire)
        pool.idle.append((session, timer))
        pool.wake()

    def _release(self, pool):
        pool.active -= 1
        pool.wake()

    @defer.inlineCallbacks
    def _open(self, pool, dest, route, qid):
        """The first address of ``route`` that gives a ready session, or a Refusal."""
        last = None
        connected = False
        prefix = f"{qid}: " if qid else ""
        for hop in route.hops:
            plaintext = False
            while True:
                tls = None if plaintext else dest.tls
                proto = SMTPClientProtocol(
                    self.hostname, hop.relay, clock=self.clock,
                    server_name=dest.host if not dest.mx else hop.host,
                    tls=tls, auth=dest.auth, qid=qid)
                try:
                    yield self._connect(hop, proto)
                except Exception as e:
                    why = _connect_error(e)
                    log.info(f"{prefix}connect to {hop.relay}: {why}", qid=qid, relay=hop.relay,
                             reason=why)
                    last = TempFail(Reply(451, "4.4.1", _clean(f"connect to {hop.relay}: {why}")))
                    break
                connected = True
                ready = yield proto.ready
                if ready is True:
                    proto.closed.addBoth(lambda _, pool=pool: self._release(pool))
                    return proto
                if ready.plaintext and not plaintext:
                    log.info(f"{prefix}TLS handshake with {hop.relay} failed; trying again "
                             "without TLS", qid=qid, relay=hop.relay)
                    plaintext = True
                    continue
                log.info(f"{prefix}session with {hop.relay} refused: {ready.outcome.reply}",
                         qid=qid, relay=hop.relay, reply=str(ready.outcome.reply))
                last = ready.outcome
                if not ready.try_next:
                    return ready
                break
        if not connected and last is not None:
            pool.dead_until = self.clock.seconds() + self.dead_time
            pool.dead_reply = last.reply
            pool.wake(everyone=True)
        if last is None:
            last = TempFail(Reply(451, "4.4.3", f"no address to deliver to for {dest.host}"))
        return Refusal(last)

    def _connect(self, hop, proto):
        if self._connect_hook is not None:
            return self._connect_hook(hop, proto)
        ip = ipaddress.ip_address(hop.ip)
        kind = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        endpoint = kind(self.reactor, str(ip), hop.port, timeout=CONNECT_TIMEOUT)
        d = endpoint.connect(_ClientFactory(lambda: proto))
        timer = self.clock.callLater(CONNECT_TIMEOUT + 1, d.cancel)

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop)

    def idle(self):
        """Close every idle session (shutdown)."""
        for pool in self._pools.values():
            while pool.idle:
                session, timer = pool.idle.pop()
                if timer.active():
                    timer.cancel()
                session.quit()
        for courier in self._lmtp.values():     # lmtp: transports keep sessions too
            idle = getattr(courier, "idle", None)
            if idle is not None:
                idle()


def _route_failure(reply):
    from mailsys.delivery import PermFail

    return PermFail(reply) if reply.code >= 500 else TempFail(reply)


def _connect_error(e):
    if isinstance(e, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(e, (error.TimeoutError, defer.CancelledError, error.UserError)):
        return "Connection timed out"
    if isinstance(e, error.NoRouteError):
        return "No route to host"
    text = str(e) or type(e).__name__
    return text


def _make_lmtp(reactor, nexthop, hostname):
    """An LMTPCourier for a transport's ``lmtp:unix:/path`` or ``lmtp:[ip]:port``."""
    from mailsys.couriers.lmtp import LMTPCourier

    if nexthop.startswith("unix:"):
        return LMTPCourier(reactor, nexthop, hostname)
    host, port, _ = parse_nexthop(nexthop, 24)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("an lmtp: transport needs an IP address or unix:PATH") from None
    kind = "tcp6" if ip.version == 6 else "tcp"
    return LMTPCourier(reactor, f"{kind}:{port}:interface={str(ip).replace(':', chr(92) + ':')}",
                       hostname)


def own_addresses(config):
    """``(ip or None, port)`` of our MTA listeners, for the self-MX check."""
    from mailsys.couriers.lmtp import split_description

    out = []
    for endpoint in config.listen.mta:
        kind, _, rest = endpoint.partition(":")
        if kind.lower() not in ("tcp", "tcp6"):
            continue
        args, kwargs = split_description(rest)
        try:
            port = int(kwargs.get("port", args[0] if args else ""))
        except ValueError:
            continue
        host = kwargs.get("interface", args[2] if len(args) > 2 else "").strip("[]")
        try:
            ip = ipaddress.ip_address(host) if host else None
        except ValueError:
            continue
        out.append((None if ip is None or ip.is_unspecified else str(ip), port))
    return out


def from_config(reactor, config, *, trust_root=None):
    """The remote courier ``config`` asks for (mailsys.tap)."""
    auth = read_credentials(config.relay.smarthost_auth) if config.relay.smarthost_auth else None
    nexthop = NextHop(dns_lookup(config.dns.nameservers, config.dns.timeout),
                      ourselves=config.server.hostname, own_addresses=own_addresses(config))
    return RemoteCourier(reactor, hostname=config.server.hostname, nexthop=nexthop,
                         relay_domains=config.domains.relay, smarthost=config.relay.smarthost,
                         smarthost_auth=auth, transport=config.relay.transport,
                         outbound_tls=config.relay.outbound_tls, trust_root=trust_root)
