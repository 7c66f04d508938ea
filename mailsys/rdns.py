"""Reverse DNS for client addresses, with dnspython, off the reactor thread.

The name goes into the Received header and the logs, so it must be one the
client's address really has.  Anyone who controls the PTR zone of an address can
make it say ``mail.google.com``; so, as Postfix does, the name is used only when
it is *forward-confirmed*: its A records (AAAA for an IPv6 client) include the
client's address.  Otherwise, or when either lookup fails or times out, the
client is ``unknown`` and a warning says why, in Postfix's words.  Names are
also checked as host names before use (nothing else can reach a header), up to
:data:`MAX_NAMES` PTR names of one address are tried, answers are cached briefly
(a busy client connects many times a second) and concurrent lookups of one
address share a single query.  Loopback addresses are named ``localhost``
without a query, as /etc/hosts would.

The lookups run in a thread pool of their own (:data:`THREADS` threads named
``PoolThread-mailsys-rdns-N``, as py-spy shows them), not the reactor's: a
name server that never answers would otherwise hold every thread of the
reactor's pool for ``dns.timeout`` and make password checks (mailsys.auth) and
the queue's MX lookups (mailsys.resolver) wait behind the clients' PTRs.  Every
lookup, its forward confirmation included and the wait for a free thread too,
ends ``dns.timeout`` seconds after the client connected, so the pool cannot
build up a backlog longer than that.
"""
import ipaddress
import re
import time

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from mailsys.logs import MailLog

log = MailLog("mailsys.rdns")

#: Threads of the reverse lookup pool.  A thread waiting on a name server costs
#: only its stack, so a burst of new clients is served at once; the bound keeps
#: a flood of them from creating threads without end.
THREADS = 20
#: PTR names of one address that are tried for a forward match, in answer order.
MAX_NAMES = 3

_HOSTNAME = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LOCALHOST = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def make_resolver(nameservers, timeout):
    import dns.resolver

    if nameservers:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = []
        ports = {}
        for ns in nameservers:
            host, port = split_host_port(ns, 53)
            r.nameservers.append(host)
            ports[host] = port
        r.nameserver_ports = ports
    else:
        r = dns.resolver.Resolver()
    r.lifetime = timeout
    r.timeout = timeout
    return r


def split_host_port(text, default_port):
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


class ReverseLookup:
    def __init__(self, reactor, clock, nameservers=(), timeout=5, ttl=300, negative_ttl=60,
                 max_entries=10000, threads=THREADS, now=time.monotonic):
        self.reactor = reactor
        self.clock = clock
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.max_entries = max_entries
        self._cache = {}
        self._inflight = {}
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._resolver = None
        self._now = now
        self.pool = ThreadPool(0, threads, name="mailsys-rdns")
        self._shutdown = None
        self._stopped = False

    def start(self):
        """Start the pool and have the reactor's shutdown stop it, as it stops
        its own pool.  The mail host starts it with its service; the first
        lookup would otherwise."""
        if self.pool.started or self._stopped:
            return
        self.pool.start()
        self._shutdown = self.reactor.addSystemEventTrigger("during", "shutdown", self._stopping)

    def stop(self):
        """Stop the pool for good: its threads end once the lookups in progress
        are done (within ``dns.timeout``), and later clients are ``unknown``
        without a query (no thread is left behind to keep the process alive)."""
        self._stopped = True
        trigger, self._shutdown = self._shutdown, None
        if trigger is not None:
            self.reactor.removeSystemEventTrigger(trigger)
        if self.pool.started:
            self.pool.stop()

    def _stopping(self):
        self._shutdown = None
        self.stop()

    def cached(self, ip):
        """The name if known now (or loopback), else None."""
        if ip in _LOCALHOST:
            return "localhost"
        hit = self._cache.get(ip)
        if hit is not None and hit[1] > self.clock.seconds():
            return hit[0]
        return None

    def lookup(self, ip):
        """Deferred firing with a forward-confirmed host name or 'unknown'; never fails."""
        name = self.cached(ip)
        if name is not None:
            return defer.succeed(name)
        if self._stopped:
            return defer.succeed("unknown")
        mine = defer.Deferred()
        waiting = self._inflight.get(ip)
        if waiting is not None:
            waiting.append(mine)
            return mine
        self._inflight[ip] = [mine]
        self.start()
        d = threads.deferToThreadPool(self.reactor, self.pool, self._query, ip,
                                      self._now() + self._timeout)
        d.addErrback(lambda f: (None, ()))
        d.addCallback(self._answered, ip)
        return mine

    def _query(self, ip, deadline=None):
        """``(name or None, warnings)`` for ``ip``, in a pool thread: the PTR
        names, then the first of them whose addresses include ``ip``.  Nothing
        is asked after ``deadline`` (``self._now()`` time)."""
        import dns.exception
        import dns.reversename

        if deadline is None:
            deadline = self._now() + self._timeout
        if self._resolver is None:
            self._resolver = make_resolver(self._nameservers, self._timeout)
        left = deadline - self._now()
        if left <= 0:
            return None, ()
        try:
            answer = self._resolver.resolve(dns.reversename.from_address(str(ip)), "PTR",
                                            lifetime=left)
        except (dns.exception.DNSException, OSError):
            return None, ()
        names = []
        for rr in answer:
            name = rr.target.to_text(omit_final_dot=True)
            if _HOSTNAME.match(name) and name.lower() not in names:
                names.append(name.lower())
                if len(names) == MAX_NAMES:
                    break
        warnings = []
        for name in names:
            problem = self._confirm(name, ip, deadline)
            if problem is None:
                return name, warnings
            warnings.append(problem)
        return None, warnings

    def _confirm(self, name, ip, deadline):
        """None when ``name``'s A (AAAA) records include ``ip``, else why not,
        as Postfix's smtpd says it (a temporary failure too: the name is not
        confirmed, so it is not used)."""
        import dns.exception
        import dns.name
        import dns.resolver

        left = deadline - self._now()
        reason = "Temporary failure in name resolution"
        if left > 0:
            try:
                answer = self._resolver.resolve(dns.name.from_text(name),
                                                "A" if ip.version == 4 else "AAAA", lifetime=left)
            except dns.resolver.NXDOMAIN:
                reason = "Name or service not known"
            except dns.resolver.NoAnswer:
                reason = "No address associated with hostname"
            except (dns.exception.DNSException, OSError):
                pass
            else:
                want = ip.packed
                for rr in answer:
                    if ipaddress.ip_address(rr.address).packed == want:
                        return None
                return f"hostname {name} does not resolve to address {ip}"
        return f"hostname {name} does not resolve to address {ip}: {reason}"

    def _answered(self, result, ip):
        name, warnings = result
        for text in warnings:
            log.warn(f"warning: {text}", client=str(ip))
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        ttl = self.ttl if name else self.negative_ttl
        result = name or "unknown"
        self._cache[ip] = (result, self.clock.seconds() + ttl)
        for d in self._inflight.pop(ip, []):
            d.callback(result)
