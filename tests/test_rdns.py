"""mailsys.rdns.ReverseLookup: forward-confirmed names, the deadline of one
lookup, and the thread pool of its own.  Fake resolvers and a task.Clock; one
test runs a real pool thread (no sleeps: it waits on a queue)."""
import ipaddress
import queue
import threading
from types import SimpleNamespace

import dns.exception
import dns.resolver
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool

from mailsys import rdns
from mailsys.rdns import ReverseLookup

V4 = ipaddress.ip_address("127.0.0.2")
V6 = ipaddress.ip_address("2001:db8::25")


class Resolver:
    """Answers from ``records``: ``{(name, rdtype): [values] or an exception}``;
    PTR values are names, A/AAAA values addresses.  Records every question."""

    def __init__(self, records):
        self.records = records
        self.asked = []

    def resolve(self, qname, rdtype, lifetime=None):
        name = qname.to_text(omit_final_dot=True)
        self.asked.append((name, rdtype, lifetime))
        answer = self.records.get((name, rdtype), dns.resolver.NXDOMAIN())
        if isinstance(answer, Exception):
            raise answer
        if rdtype == "PTR":
            return [SimpleNamespace(target=dns.name.from_text(v)) for v in answer]
        return [SimpleNamespace(address=v) for v in answer]


class Now:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def lookup_for(records, now=None, timeout=5, reactor=None):
    r = ReverseLookup(reactor, Clock(), timeout=timeout, now=now or Now())
    r._resolver = Resolver(records)
    return r


PTR_V4 = "2.0.0.127.in-addr.arpa"
PTR_V6 = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


# -- forward confirmation ------------------------------------------------------------------

def test_name_whose_address_is_the_clients_is_used():
    r = lookup_for({(PTR_V4, "PTR"): ["Mail.Example.NET."],
                    ("mail.example.net", "A"): ["192.0.2.1", "127.0.0.2"]})
    assert r._query(V4) == ("mail.example.net", [])
    assert [q[:2] for q in r._resolver.asked] == [(PTR_V4, "PTR"), ("mail.example.net", "A")]


@pytest.mark.parametrize("answer, warning", [
    (["192.0.2.1"], "hostname mail.google.com does not resolve to address 127.0.0.2"),
    (dns.resolver.NXDOMAIN(),
     "hostname mail.google.com does not resolve to address 127.0.0.2: Name or service not known"),
    (dns.resolver.NoAnswer(),
     "hostname mail.google.com does not resolve to address 127.0.0.2: "
     "No address associated with hostname"),
    (dns.exception.Timeout(),
     "hostname mail.google.com does not resolve to address 127.0.0.2: "
     "Temporary failure in name resolution"),
    (dns.resolver.NoNameservers(),
     "hostname mail.google.com does not resolve to address 127.0.0.2: "
     "Temporary failure in name resolution"),
    (OSError(101, "Network is unreachable"),
     "hostname mail.google.com does not resolve to address 127.0.0.2: "
     "Temporary failure in name resolution"),
])
def test_name_not_confirmed_is_not_used(answer, warning):
    """A PTR of 127.0.0.2 saying mail.google.com, whose addresses are not 127.0.0.2
    (or not found, or not known now): the client is unknown, as with Postfix."""
    r = lookup_for({(PTR_V4, "PTR"): ["mail.google.com."], ("mail.google.com", "A"): answer})
    assert r._query(V4) == (None, [warning])


def test_ipv6_client_is_confirmed_by_aaaa_records():
    r = lookup_for({(PTR_V6, "PTR"): ["mx.example.net."],
                    ("mx.example.net", "A"): ["127.0.0.2"],
                    ("mx.example.net", "AAAA"): ["2001:DB8:0::25"]})
    assert r._query(V6) == ("mx.example.net", [])
    assert [q[:2] for q in r._resolver.asked] == [(PTR_V6, "PTR"), ("mx.example.net", "AAAA")]


def test_ipv6_client_with_only_an_a_record_is_unknown():
    r = lookup_for({(PTR_V6, "PTR"): ["mx.example.net."],
                    ("mx.example.net", "A"): ["127.0.0.2"],
                    ("mx.example.net", "AAAA"): dns.resolver.NoAnswer()})
    assert r._query(V6) == (None, [
        "hostname mx.example.net does not resolve to address 2001:db8::25: "
        "No address associated with hostname"])


def test_a_later_ptr_name_that_confirms_is_used():
    r = lookup_for({(PTR_V4, "PTR"): ["forged.example.", "bad name.example.", "real.example.",
                                      "other.example."],
                    ("real.example", "A"): ["127.0.0.2"]})
    assert r._query(V4) == ("real.example", [
        "hostname forged.example does not resolve to address 127.0.0.2: Name or service not known"])


def test_at_most_max_names_are_tried():
    names = [f"n{i}.example." for i in range(rdns.MAX_NAMES + 2)]
    r = lookup_for({(PTR_V4, "PTR"): names, (f"n{rdns.MAX_NAMES}.example", "A"): ["127.0.0.2"]})
    name, warnings = r._query(V4)
    assert name is None and len(warnings) == rdns.MAX_NAMES
    assert len(r._resolver.asked) == 1 + rdns.MAX_NAMES


# -- one deadline per lookup ---------------------------------------------------------------

class SlowResolver(Resolver):
    """Each question takes ``cost`` seconds of the fake clock."""

    def __init__(self, records, now, cost):
        super().__init__(records)
        self.now, self.cost = now, cost

    def resolve(self, qname, rdtype, lifetime=None):
        self.now.t += self.cost
        return super().resolve(qname, rdtype, lifetime)


def test_forward_lookup_gets_what_is_left_of_dns_timeout():
    now = Now()
    r = lookup_for({}, now=now, timeout=5)
    r._resolver = SlowResolver({(PTR_V4, "PTR"): ["mail.example.net."],
                                ("mail.example.net", "A"): ["127.0.0.2"]}, now, 2)
    assert r._query(V4, deadline=1005.0) == ("mail.example.net", [])
    assert [q[2] for q in r._resolver.asked] == [5.0, 3.0]


def test_no_forward_lookup_once_the_time_is_up():
    now = Now()
    r = lookup_for({}, now=now, timeout=5)
    r._resolver = SlowResolver({(PTR_V4, "PTR"): ["mail.example.net."],
                                ("mail.example.net", "A"): ["127.0.0.2"]}, now, 5)
    assert r._query(V4, deadline=1005.0) == (None, [
        "hostname mail.example.net does not resolve to address 127.0.0.2: "
        "Temporary failure in name resolution"])
    assert len(r._resolver.asked) == 1


def test_no_query_when_the_thread_came_too_late():
    """A lookup that waited for a free thread past dns.timeout asks nothing."""
    r = lookup_for({(PTR_V4, "PTR"): ["mail.example.net."]}, now=Now(1005.0))
    assert r._query(V4, deadline=1005.0) == (None, ())
    assert r._resolver.asked == []


# -- through lookup(): its own pool, the cache, the warning ------------------------------------

class SyncPool:
    """A ThreadPool stand-in that runs the work at once."""

    def __init__(self):
        self.started = False
        self.calls = 0

    def start(self):
        self.started = True

    def stop(self):
        self.started = False

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls += 1
        on_result(True, f(*args, **kwargs))


class FakeReactor:
    def __init__(self):
        self.triggers = {}
        self.from_thread = queue.SimpleQueue()
        self.immediate = True

    def getThreadPool(self):
        raise AssertionError("reverse lookups must not use the reactor's thread pool")

    def callFromThread(self, f, *args):
        if self.immediate:
            f(*args)
        else:
            self.from_thread.put((f, args))

    def addSystemEventTrigger(self, phase, event, f):
        key = object()
        self.triggers[key] = (phase, event, f)
        return key

    def removeSystemEventTrigger(self, key):
        del self.triggers[key]


def logged(f):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        result = f()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return result, [(e["log_namespace"], e["log_level"].name, e.get("text")) for e in events]


def test_lookup_uses_its_own_pool_caches_and_warns_once():
    reactor = FakeReactor()
    r = lookup_for({(PTR_V4, "PTR"): ["mail.google.com."], ("mail.google.com", "A"): ["192.0.2.1"]},
                   reactor=reactor)
    r.pool = SyncPool()
    names = []
    d, events = logged(lambda: r.lookup(V4).addCallback(names.append))
    assert names == ["unknown"] and r.pool.calls == 1
    assert events == [("mailsys.rdns", "warn",
                       "warning: hostname mail.google.com does not resolve to address 127.0.0.2")]
    assert r.cached(V4) == "unknown"
    _, events = logged(lambda: r.lookup(V4).addCallback(names.append))
    assert names == ["unknown", "unknown"] and r.pool.calls == 1 and events == []
    r.clock.advance(r.negative_ttl)
    assert r.cached(V4) is None


def test_the_pool_is_its_own_named_and_bounded_and_stops_at_shutdown():
    reactor = FakeReactor()
    r = ReverseLookup(reactor, Clock())
    assert isinstance(r.pool, ThreadPool)
    assert (r.pool.name, r.pool.min, r.pool.max) == ("mailsys-rdns", 0, rdns.THREADS)
    r.start()
    try:
        assert r.pool.started
        assert [(p, e) for p, e, _ in reactor.triggers.values()] == [("during", "shutdown")]
        r.start()      # once only
        assert len(reactor.triggers) == 1
    finally:
        [(_, _, shutdown)] = reactor.triggers.values()
        shutdown()
    assert not r.pool.started and r.pool.joined
    # Stopped for good: a late client is unknown without a query or a thread.
    r._resolver = Resolver({})
    names = []
    r.lookup(V4).addCallback(names.append)
    assert names == ["unknown"] and r._resolver.asked == [] and not r.pool.started


def test_stop_before_shutdown_removes_the_trigger():
    reactor = FakeReactor()
    r = ReverseLookup(reactor, Clock())
    r.start()
    r.stop()
    assert reactor.triggers == {} and r.pool.joined


def test_lookup_runs_in_a_pool_thread_named_for_py_spy():
    reactor = FakeReactor()
    reactor.immediate = False
    r = lookup_for({(PTR_V4, "PTR"): ["mail.example.net."],
                    ("mail.example.net", "A"): ["127.0.0.2"]}, reactor=reactor)
    threads = []
    resolve = r._resolver.resolve

    def in_thread(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return resolve(*args, **kwargs)

    r._resolver.resolve = in_thread
    names = []
    r.lookup(V4).addCallback(names.append)
    try:
        f, args = reactor.from_thread.get(timeout=30)
        f(*args)
    finally:
        r.stop()
    assert names == ["mail.example.net"]
    assert threads == ["PoolThread-mailsys-rdns-0"] * 2


def test_concurrent_lookups_of_one_address_share_one_query():
    reactor = FakeReactor()
    r = lookup_for({(PTR_V4, "PTR"): ["mail.example.net."],
                    ("mail.example.net", "A"): ["127.0.0.2"]}, reactor=reactor)
    held = []
    r.pool = SimpleNamespace(started=False, start=lambda: None,
                             callInThreadWithCallback=lambda cb, f, *a: held.append((cb, f, a)))
    first, second = r.lookup(V4), r.lookup(V4)
    assert len(held) == 1
    cb, f, a = held[0]
    cb(True, f(*a))
    assert first.result == second.result == "mail.example.net"


def test_loopback_needs_no_query():
    r = ReverseLookup(None, Clock())
    assert r.cached(ipaddress.ip_address("127.0.0.1")) == "localhost"
    assert r.cached(ipaddress.ip_address("::1")) == "localhost"
    d = r.lookup(ipaddress.ip_address("::1"))
    assert isinstance(d, defer.Deferred) and d.result == "localhost"
