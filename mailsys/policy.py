"""Pure decisions: may this client relay, is this recipient ours.

No I/O and no protocol here: the functions take what they need and return a
Reply to refuse or None to accept.  They fail closed: a recipient domain that no
rule claims is refused unless the client is allowed to relay.
"""
import ipaddress

from mailsys.smtp import reply as R


def client_address(host):
    """``(ip, text)`` for a peer address as Twisted gives it (``addr.host``):
    the ipaddress object (None when ``host`` is not an IP address) and the
    text for logs and the Received header.

    A dual-stack IPv6 listener (``tcp6:25:interface=\\:\\:``) sees its IPv4
    clients as IPv4-mapped addresses (``::ffff:192.0.2.1``, RFC 4291 2.5.5.2).
    Those are IPv4 clients, and everything about a client (``relay.mynetworks``,
    the reverse lookup, the per-IP limits, the logs, ``Received``) must see
    them as such, whichever listener they came in on: Postfix converts them to
    plain IPv4 the same way, where smtpd takes the client's address."""
    if not host:
        return None, host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None, host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
        return ip, str(ip)
    return ip, host


def client_may_relay(ip, mynetworks):
    """True when ``ip`` (an ipaddress object) is inside ``relay.mynetworks``."""
    if ip is None:
        return False
    for net in mynetworks:
        if ip.version == net.version and ip in net:
            return True
    return False


def check_recipient(rcpt, *, local_domains, relay_domains, accounts, may_relay):
    """The MTA's RCPT decision (issue 2, CONTRACT section 2 [domains]).

    ``rcpt`` is the parsed Mailbox; ``may_relay`` is True for clients in
    mynetworks or authenticated submission clients.
    """
    domain = rcpt.domain
    if domain == "":
        return None  # bare <postmaster>: RFC 5321 4.1.1.3
    if domain in local_domains:
        if rcpt.local.lower() == "postmaster" or accounts.accepts(str(rcpt)):
            return None
        return R.UNKNOWN_USER
    if domain in relay_domains:
        return None
    if may_relay:
        return None
    return R.RELAY_DENIED
