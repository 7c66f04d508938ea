"""Next-hop resolution: where does mail for a domain go (RFC 5321 section 5)?

The answer is a :class:`Route`: the addresses to try, in order, each with the
host name it came from (for the log, the DSN's Remote-MTA and TLS
verification).  The rules:

* MX records sorted by preference; MXes of equal preference shuffled, so load
  spreads as their owner intended.
* No MX (the name exists, but has no MX data): the domain itself is the only
  MX, preference 0 ("implicit MX").
* A null MX (RFC 7505: one MX with the root as its target): the domain accepts
  no mail; a permanent ``5.1.10``.
* NXDOMAIN: a permanent ``5.1.2``.  SERVFAIL, a timeout, no answer from any
  name server: temporary ``4.4.3``; the queue retries.
* An MX that is this host (our ``server.hostname``, or one of our own
  listening addresses and ports) is dropped together with every MX of equal
  or worse preference, as Postfix does: a backup MX relays only to better
  MXes.  Nothing left means mail would loop back to us: ``5.4.6``.
* Each MX host's AAAA then A records (IPv6 first, as RFC 6724's default
  policy prefers), at most :data:`MAX_ADDRESSES` in all.

The DNS work is blocking dnspython in the reactor's thread pool (as
mailsys.rdns does), so the reactor never waits for a name server; the logic
itself is a plain function of the answers and is tested with a fake lookup.
"""
import functools
import ipaddress
import random
import socket

from twisted.internet import defer, threads

from mailsys.smtp.reply import Reply

MAX_ADDRESSES = 10      # addresses tried per delivery attempt, over all MX hosts

OK, NXDOMAIN, NODATA, TEMP = "ok", "nxdomain", "nodata", "temp"


class Hop:
    """One address to try: ``host`` the name it came from, ``ip``, ``port``."""

    __slots__ = ("host", "ip", "port", "preference")

    def __init__(self, host, ip, port, preference=0):
        self.host, self.ip, self.port, self.preference = host, ip, port, preference

    @property
    def relay(self):
        """``host[ip]:port``, as the log lines and Outcome.relay show it."""
        return f"{self.host}[{self.ip}]:{self.port}"

    def __repr__(self):
        return f"Hop({self.relay})"

    def __eq__(self, other):
        return isinstance(other, Hop) and (self.host, self.ip, self.port, self.preference) == (
            other.host, other.ip, other.port, other.preference)


class Route:
    """Addresses to try in order (``hops``), or why there are none: ``error`` is a
    Reply whose class (4xx / 5xx) says whether to retry."""

    __slots__ = ("hops", "error")

    def __init__(self, hops=(), error=None):
        self.hops = list(hops)
        self.error = error

    def __repr__(self):
        return f"Route({self.hops!r}, {self.error})"


def order_mx(records, rng=random):
    """``[(preference, host)]`` sorted by preference, equal preferences shuffled."""
    groups = {}
    for pref, host in records:
        groups.setdefault(pref, []).append(host)
    out = []
    for pref in sorted(groups):
        hosts = list(groups[pref])
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


def _name(text):
    return str(text).strip().rstrip(".").lower()


def _not_found(name, rdtype, status):
    if status == TEMP:
        return Reply(451, "4.4.3", f"Host or domain name not found. Name service error for "
                                   f"name={name} type={rdtype}: Host not found, try again")
    return Reply(550, "5.1.2", f"Host or domain name not found. Name service error for "
                               f"name={name} type={rdtype}: Host not found")


class NextHop:
    """Route lookups with the rules above.

    ``lookup(name, rdtype)`` answers ``(status, records)``: status one of OK,
    NXDOMAIN, NODATA, TEMP; records ``[(preference, host)]`` for MX, address
    strings for A and AAAA.  It runs in a thread through ``run`` (default: the
    reactor's pool); tests pass a synchronous ``run`` and a fake lookup.

    ``ourselves`` is our host name; ``own_addresses`` the ``(ip, port)`` pairs we
    listen on (``ip`` None for every address: then any loopback address, and any
    address of this machine (``is_local``), on that port counts as ours: an MX
    named otherwise but resolving to our public address is still us).
    """

    def __init__(self, lookup, *, ourselves="", own_addresses=(), run=None, rng=None,
                 is_local=None):
        self.is_local = is_local or local_address
        self.lookup = lookup
        self.ourselves = _name(ourselves)
        self.own_addresses = {(None if ip is None else ipaddress.ip_address(ip), int(port))
                              for ip, port in own_addresses}
        self.run = run
        self.rng = rng or random.Random()

    def route(self, domain, port=25, *, mx=True):
        """Deferred Route for ``domain`` (``mx=False``: the host itself, no MX
        lookup, as for ``[host]``).  Never fails: trouble is a Route with an error."""
        if self.run is None:
            from twisted.internet import reactor

            d = threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                          self.route_now, domain, port, mx)
        else:
            d = defer.maybeDeferred(self.run, self.route_now, domain, port, mx)

        def broken(failure):
            return Route(error=Reply(451, "4.4.3", f"Name service error for {domain}: "
                                                   f"{failure.getErrorMessage()[:200]}"))

        return d.addErrback(broken)

    # -- the rules, synchronously ------------------------------------------------------

    def route_now(self, domain, port=25, mx=True):
        domain = _name(domain)
        literal = _ip_literal(domain)
        if literal is not None:
            hops = [Hop(literal, literal, port)]
            return self._without_self(domain, [(0, domain, hops)], explicit=True)
        if domain.startswith("["):
            return Route(error=Reply(550, "5.1.3", f"Bad address literal {domain[:100]}: not an "
                                                   "IPv4 or IPv6 address"))
        if not mx:
            hops, error = self._addresses(domain, port, 0)
            if error is not None and not hops:
                return Route(error=error)
            return self._without_self(domain, [(0, domain, hops)], explicit=True)
        status, records = self.lookup(domain, "MX")
        if status == NXDOMAIN or status == TEMP:
            return Route(error=_not_found(domain, "MX", status))
        records = [(int(p), _name(h)) for p, h in records] if status == OK else []
        if not records:
            # Implicit MX (RFC 5321 5.1): the domain's own addresses.
            hops, error = self._addresses(domain, port, 0)
            if not hops:
                return Route(error=error or _not_found(domain, "A", NXDOMAIN))
            return self._without_self(domain, [(0, domain, hops)], explicit=False)
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if not real:
            return Route(error=Reply(556, "5.1.10", f"Domain {domain} does not accept mail "
                                                    "(null MX, RFC 7505)"))
        hosts = []
        temp = None
        for pref, host in order_mx(real, self.rng):
            hops, error = self._addresses(host, port, pref)
            if error is not None and error.code < 500:
                temp = temp or error
            hosts.append((pref, host, hops))
        route = self._without_self(domain, hosts, explicit=False)
        if route.error is None and not route.hops:
            route.error = temp or Reply(554, "5.4.4", f"Unable to route: no address for any MX "
                                                      f"host of {domain}")
        return route

    def _addresses(self, host, port, pref):
        """``([Hop], error)``: AAAA then A; error a Reply when neither gave any."""
        hops, statuses = [], []
        for rdtype in ("AAAA", "A"):
            status, records = self.lookup(host, rdtype)
            statuses.append(status)
            if status == OK:
                hops.extend(Hop(host, str(ipaddress.ip_address(a)), port, pref) for a in records)
        if hops:
            return hops, None
        if TEMP in statuses:
            return [], _not_found(host, "A", TEMP)
        return [], _not_found(host, "A", NXDOMAIN)

    def is_self(self, hop):
        if self.ourselves and hop.host == self.ourselves:
            return True
        ip = ipaddress.ip_address(hop.ip)
        if (ip, hop.port) in self.own_addresses:
            return True
        if (None, hop.port) not in self.own_addresses:
            return False
        return ip.is_loopback or ip.is_unspecified or self.is_local(str(ip))

    def _without_self(self, domain, hosts, explicit):
        """Postfix's rule: drop our own MX and every one not better than it."""
        mine = [pref for pref, host, hops in hosts
                if (self.ourselves and host == self.ourselves) or any(self.is_self(h) for h in hops)]
        if mine:
            best_self = min(mine)
            hosts = [(p, h, hops) for p, h, hops in hosts if p < best_self]
            if not hosts:
                what = "its next hop" if explicit else "the best MX host"
                return Route(error=Reply(554, "5.4.6", f"mail for {domain} loops back to myself "
                                                       f"({what} is this host)"))
        hops = [h for _, _, hs in hosts for h in hs]
        return Route(hops[:MAX_ADDRESSES])


def _ip_literal(text):
    """The address an address literal names (RFC 5321 4.1.3: the domain of
    ``u@[192.0.2.1]`` or ``u@[IPv6:2001:db8::1]``, mail for that host and no DNS
    lookup), or a transport's ``[host]`` already without its brackets; None for
    a name."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text.startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


# --- dnspython ------------------------------------------------------------------------

def dns_lookup(nameservers=(), timeout=5):
    """A ``lookup(name, rdtype)`` for :class:`NextHop` on dnspython: ``dns.nameservers``
    when given (never the system resolver then), else /etc/resolv.conf."""
    from mailsys.rdns import make_resolver

    state = {}

    def lookup(name, rdtype):
        import dns.exception
        import dns.resolver

        resolver = state.get("r")
        if resolver is None:
            resolver = state["r"] = make_resolver(tuple(nameservers), timeout)
        try:
            answer = resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return NXDOMAIN, []
        except (dns.resolver.NoNameservers, dns.exception.Timeout, OSError):
            return TEMP, []
        except dns.exception.DNSException:
            return TEMP, []
        if answer.rrset is None:
            return NODATA, []
        if rdtype == "MX":
            return OK, [(rr.preference, rr.exchange.to_text(omit_final_dot=True) or ".")
                        for rr in answer.rrset]
        return OK, [rr.address for rr in answer.rrset]

    return lookup


@functools.lru_cache(maxsize=1024)
def local_address(ip):
    """Whether ``ip`` is an address of this machine: the kernel lets a socket bind
    to it (EADDRNOTAVAIL otherwise), which covers every interface and alias
    without reading them.  (A host with ``ip_nonlocal_bind`` set answers yes for
    everything: there, name the listener's address in ``listen.mta``.)"""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False
