"""Reverse DNS for client addresses, with dnspython, off the reactor thread.

The name goes into the Received header and the logs, so it is checked as a host
name before use (``unknown`` otherwise), answers are cached briefly (a busy
client connects many times a second) and concurrent lookups of one address
share a single query.  Loopback addresses are named ``localhost`` without a
query, as /etc/hosts would.
"""
import ipaddress
import re

from twisted.internet import defer, threads

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
                 max_entries=10000):
        self.reactor = reactor
        self.clock = clock
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.max_entries = max_entries
        self._cache = {}
        self._inflight = {}
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._resolver = None

    def cached(self, ip):
        """The name if known now (or loopback), else None."""
        if ip in _LOCALHOST:
            return "localhost"
        hit = self._cache.get(ip)
        if hit is not None and hit[1] > self.clock.seconds():
            return hit[0]
        return None

    def lookup(self, ip):
        """Deferred firing with a checked host name or 'unknown'; never fails."""
        name = self.cached(ip)
        if name is not None:
            return defer.succeed(name)
        waiting = self._inflight.get(ip)
        if waiting is None:
            waiting = self._inflight[ip] = []
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._query, ip)
            d.addErrback(lambda f: None)
            d.addCallback(self._answered, ip)
        mine = defer.Deferred()
        waiting.append(mine)
        return mine

    def _query(self, ip):
        import dns.exception
        import dns.resolver
        import dns.reversename

        if self._resolver is None:
            self._resolver = make_resolver(self._nameservers, self._timeout)
        try:
            answer = self._resolver.resolve(dns.reversename.from_address(str(ip)), "PTR")
        except (dns.exception.DNSException, OSError):
            return None
        for rr in answer:
            name = rr.target.to_text(omit_final_dot=True)
            if _HOSTNAME.match(name):
                return name.lower()
        return None

    def _answered(self, name, ip):
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        ttl = self.ttl if name else self.negative_ttl
        result = name or "unknown"
        self._cache[ip] = (result, self.clock.seconds() + ttl)
        for d in self._inflight.pop(ip, []):
            d.callback(result)
