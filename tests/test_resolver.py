"""Next-hop rules (mailsys.resolver) on a fake DNS: sorting, shuffling, implicit MX,
null MX, NXDOMAIN, SERVFAIL, the self-MX loop, IPv4 and IPv6."""
import random
from collections import Counter

from twisted.trial import unittest

from mailsys.resolver import NODATA, NXDOMAIN, OK, TEMP, Hop, NextHop, local_address, order_mx
from mailsys.smtp.reply import Reply


def fake(zone):
    """``zone``: {(name, type): records | status}."""
    def lookup(name, rdtype):
        value = zone.get((name, rdtype))
        if value is None:
            names = {n for n, _ in zone}
            return (NODATA, []) if name in names else (NXDOMAIN, [])
        if isinstance(value, str):
            return value, []
        return OK, list(value)
    return lookup


def nexthop(zone, **kw):
    kw.setdefault("rng", random.Random(1))
    return NextHop(fake(zone), run=lambda f, *a: f(*a), **kw)


def route(nh, domain, port=25, mx=True):
    out = []
    nh.route(domain, port, mx=mx).addCallback(out.append)
    return out[0]


ZONE = {
    ("remote.test", "MX"): [(20, "mx2.remote.test"), (10, "mx1.remote.test")],
    ("mx1.remote.test", "A"): ["127.0.0.1"],
    ("mx1.remote.test", "AAAA"): ["::1"],
    ("mx2.remote.test", "A"): ["127.0.0.2"],
    ("implicit.test", "A"): ["127.0.0.3"],
    ("implicit.test", "TXT"): ["x"],
    ("null.test", "MX"): [(0, ".")],
    ("fail.test", "MX"): TEMP,
    ("nomx-addr.test", "MX"): [(10, "gone.test")],
    ("self.test", "MX"): [(10, "mx.mailsys.test"), (20, "mx2.remote.test")],
    ("backup.test", "MX"): [(10, "mx1.remote.test"), (20, "mx.mailsys.test"),
                            (30, "mx2.remote.test")],
    ("byaddr.test", "MX"): [(5, "other.test")],
    ("other.test", "A"): ["127.0.0.9"],
}


class Rules(unittest.TestCase):
    def test_sorted_by_preference_ipv6_first(self):
        r = route(nexthop(ZONE), "remote.test")
        self.assertIsNone(r.error)
        self.assertEqual(r.hops, [Hop("mx1.remote.test", "::1", 25, 10),
                                  Hop("mx1.remote.test", "127.0.0.1", 25, 10),
                                  Hop("mx2.remote.test", "127.0.0.2", 25, 20)])
        self.assertEqual(r.hops[0].relay, "mx1.remote.test[::1]:25")

    def test_equal_preferences_shuffled(self):
        records = [(10, "a"), (10, "b"), (10, "c"), (5, "first"), (20, "last")]
        seen = Counter()
        rng = random.Random(7)
        for _ in range(300):
            out = order_mx(records, rng)
            self.assertEqual(out[0], (5, "first"))
            self.assertEqual(out[-1], (20, "last"))
            self.assertEqual(sorted(h for _, h in out[1:4]), ["a", "b", "c"])
            seen[out[1][1]] += 1
        self.assertEqual(set(seen), {"a", "b", "c"})
        self.assertTrue(all(n > 60 for n in seen.values()), seen)

    def test_implicit_mx(self):
        r = route(nexthop(ZONE), "implicit.test", 2525)
        self.assertEqual(r.hops, [Hop("implicit.test", "127.0.0.3", 2525, 0)])

    def test_null_mx(self):
        r = route(nexthop(ZONE), "null.test")
        self.assertEqual(r.error, Reply(556, "5.1.10", "Domain null.test does not accept mail "
                                                       "(null MX, RFC 7505)"))

    def test_nxdomain(self):
        r = route(nexthop(ZONE), "nowhere.test")
        self.assertEqual(r.error, Reply(550, "5.1.2", "Host or domain name not found. Name service "
                                                      "error for name=nowhere.test type=MX: Host "
                                                      "not found"))

    def test_servfail_defers(self):
        r = route(nexthop(ZONE), "fail.test")
        self.assertEqual(r.error.code, 451)
        self.assertEqual(r.error.status, "4.4.3")

    def test_mx_without_address(self):
        r = route(nexthop(ZONE), "nomx-addr.test")
        self.assertEqual(r.error, Reply(554, "5.4.4", "Unable to route: no address for any MX "
                                                      "host of nomx-addr.test"))

    def test_mx_address_lookup_servfail_defers(self):
        zone = dict(ZONE)
        zone[("gone.test", "A")] = TEMP
        r = route(nexthop(zone), "nomx-addr.test")
        self.assertEqual(r.error.status, "4.4.3")

    def test_self_as_best_mx_is_a_loop(self):
        r = route(nexthop(ZONE, ourselves="mx.mailsys.test"), "self.test")
        self.assertEqual(r.error, Reply(554, "5.4.6", "mail for self.test loops back to myself "
                                                      "(the best MX host is this host)"))

    def test_backup_mx_delivers_to_better_mx_only(self):
        r = route(nexthop(ZONE, ourselves="mx.mailsys.test"), "backup.test")
        self.assertEqual([h.host for h in r.hops], ["mx1.remote.test", "mx1.remote.test"])

    def test_self_by_listening_address_and_port(self):
        nh = nexthop(ZONE, own_addresses=[("127.0.0.9", 25)])
        self.assertEqual(route(nh, "byaddr.test").error.status, "5.4.6")
        # Same address, another port: not us.
        self.assertEqual(route(nh, "byaddr.test", 2525).hops,
                         [Hop("other.test", "127.0.0.9", 2525, 5)])

    def test_wildcard_listener_matches_loopback(self):
        nh = nexthop(ZONE, own_addresses=[(None, 25)])
        self.assertEqual(route(nh, "byaddr.test").error.status, "5.4.6")

    def test_wildcard_listener_matches_every_address_of_this_machine(self):
        zone = {**ZONE, ("public.test", "MX"): [(10, "mx.public.test")],
                ("mx.public.test", "A"): ["192.0.2.7"]}
        ours = nexthop(zone, own_addresses=[(None, 25)], is_local=lambda ip: ip == "192.0.2.7")
        self.assertEqual(route(ours, "public.test").error.status, "5.4.6")
        theirs = nexthop(zone, own_addresses=[(None, 25)], is_local=lambda ip: False)
        self.assertEqual(route(theirs, "public.test").hops, [Hop("mx.public.test", "192.0.2.7", 25, 10)])
        # A listener on one address only: another local address is not us.
        one = nexthop(zone, own_addresses=[("127.0.0.1", 25)], is_local=lambda ip: True)
        self.assertEqual(route(one, "public.test").hops, [Hop("mx.public.test", "192.0.2.7", 25, 10)])

    def test_local_address_asks_the_kernel(self):
        self.assertTrue(local_address("127.0.0.1"))
        self.assertTrue(local_address("127.0.0.53"))        # all of 127/8 is local on Linux
        self.assertFalse(local_address("192.0.2.1"))        # TEST-NET-1: never assigned
        self.assertFalse(local_address("2001:db8::1"))      # documentation prefix

    def test_bracketed_host_no_mx_lookup(self):
        r = route(nexthop(ZONE), "mx2.remote.test", 587, mx=False)
        self.assertEqual(r.hops, [Hop("mx2.remote.test", "127.0.0.2", 587, 0)])
        r = route(nexthop(ZONE), "remote.test", 587, mx=False)
        self.assertEqual(r.error.status, "5.1.2")

    def test_ip_literal(self):
        r = route(nexthop(ZONE), "::1", 2525, mx=False)
        self.assertEqual(r.hops, [Hop("::1", "::1", 2525, 0)])

    def test_address_literal_domains_go_to_that_address(self):
        """RFC 5321 4.1.3: mail for u@[192.0.2.1] goes to that host, with no DNS
        lookup (it was looked up as a name, "[192.0.2.1]", and bounced 5.1.2)."""
        def no_dns(name, rdtype):
            raise AssertionError(f"looked up {name} {rdtype}")
        nh = NextHop(no_dns, run=lambda f, *a: f(*a))
        self.assertEqual(route(nh, "[192.0.2.7]").hops, [Hop("192.0.2.7", "192.0.2.7", 25, 0)])
        self.assertEqual(route(nh, "[IPv6:2001:DB8::7]").hops,
                         [Hop("2001:db8::7", "2001:db8::7", 25, 0)])
        self.assertEqual(route(nh, "[not-an-address]").error, Reply(
            550, "5.1.3", "Bad address literal [not-an-address]: not an IPv4 or IPv6 address"))

    def test_lookup_exception_is_tempfail(self):
        def boom(name, rdtype):
            raise RuntimeError("resolver broke")
        r = route(NextHop(boom, run=lambda f, *a: f(*a)), "remote.test")
        self.assertEqual(r.error.status, "4.4.3")
