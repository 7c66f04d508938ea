"""``twistd mailsys``: options and the MultiService wiring every role together.

Configuration is loaded and validated before anything listens: a bad file makes
twistd refuse to start with the same ``FILE:LINE: key: problem`` lines that
``mailsys config check`` prints.
"""
import os
import sys

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python import usage

from mailsys.config import ConfigError, load

log = Logger(namespace="mailsys")


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "configuration file (default: $MAILSYS_CONFIG, else the embedded default)"],
    ]

    def postOptions(self):
        path = self["config"] or os.environ.get("MAILSYS_CONFIG") or None
        try:
            self.config = load(path)
        except ConfigError as e:
            # usage.UsageError makes twistd print this and exit non-zero.
            raise usage.UsageError("configuration problems:\n" + str(e))


class MailHost(service.MultiService):
    """Owns the shared state (spool, accounts, limits) of all listeners."""

    def __init__(self, config, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        from mailsys.accounts import Accounts
        from mailsys.rdns import ReverseLookup
        from mailsys.receive import ConnectionLimiter
        from mailsys.spool import Spool

        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.local_domains = frozenset(config.domains.local)
        self.relay_domains = frozenset(config.domains.relay)
        self.mynetworks = config.relay.mynetworks
        self.limiter = ConnectionLimiter(config.limits.connections, config.limits.connections_per_ip)
        self.rdns = ReverseLookup(reactor, reactor, config.dns.nameservers, config.dns.timeout)
        self.accounts = Accounts(config.accounts.users, config.accounts.aliases,
                                 config.domains.local, clock=reactor)
        self.spool = Spool(os.path.join(config.server.state_dir, "spool"), reactor)
        self._relay_cache = {}
        self.tls = self._load_tls()
        from mailsys.auth import FailureThrottle, make_portal

        self.portal = make_portal(self.accounts, reactor)
        self.auth_throttle = FailureThrottle(reactor)

    def _load_tls(self):
        """The TLS context for every role, or None: STARTTLS is then not offered.

        The embedded default makes itself a self-signed certificate on first
        start so a development host offers STARTTLS at once (CONTRACT section 4).
        """
        from mailsys.config import EMBEDDED_SOURCE
        from mailsys.tls import ServerTLS, write_self_signed

        cfg = self.config.tls
        if self.config.source == EMBEDDED_SOURCE and not os.path.exists(cfg.certificate):
            write_self_signed(self.config.server.hostname, cfg.certificate, cfg.key)
            log.info("wrote a self-signed certificate to {path}", path=cfg.certificate)
        if not (os.path.exists(cfg.certificate) and os.path.exists(cfg.key)):
            if self.config.listen.submissions:
                raise TLSNeeded(f"listen.submissions needs a certificate, but {cfg.certificate} "
                                f"or {cfg.key} does not exist; run 'mailsys tls self-signed' "
                                f"or point [tls] at your certificate")
            log.warn("no TLS certificate at {path}: STARTTLS is not offered", path=cfg.certificate)
            return None
        return ServerTLS(cfg.certificate, cfg.key, self.reactor)

    def may_relay(self, ip):
        hit = self._relay_cache.get(ip)
        if hit is None:
            from mailsys.policy import client_may_relay

            if len(self._relay_cache) > 10000:
                self._relay_cache.clear()
            hit = self._relay_cache[ip] = client_may_relay(ip, self.mynetworks)
        return hit

    def privilegedStartService(self):
        # Listeners start here (before startService); the state directory holds
        # the LMTP socket and the spool must be recovered before mail arrives.
        os.makedirs(self.config.server.state_dir, mode=0o700, exist_ok=True)
        for endpoint in self.config.listen.lmtp:
            _remove_stale_unix_socket(endpoint)
        self.spool.open()
        super().privilegedStartService()

    def startService(self):
        super().startService()
        log.info("mailsys started: {hostname}, state in {state_dir}",
                 hostname=self.config.server.hostname, state_dir=self.config.server.state_dir)

    def stopService(self):
        d = super().stopService()

        def closed(result):
            self.spool.close()
            return result

        if d is None:
            closed(None)
            return None
        return d.addBoth(closed)


class TLSNeeded(Exception):
    pass


def _remove_stale_unix_socket(endpoint):
    """A socket file left by a killed server blocks the next bind: remove it
    when nothing answers on it (a live server keeps its socket)."""
    import socket
    import stat

    if not endpoint.startswith("unix:"):
        return
    path = endpoint[5:].split(":")[0].replace("\\:", ":")
    if path.startswith("address="):
        path = path[8:]
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)
    finally:
        s.close()


def build(config, reactor=None):
    from mailsys.receive import ReceiveFactory, implicit_tls

    host = MailHost(config, reactor)
    roles = [("mta", config.listen.mta), ("submission", config.listen.submission),
             ("submissions", config.listen.submissions)]
    if config.listen.lmtp:
        from mailsys.mda.lmtp import LMTPFactory, MDA

        mda = MDA(config, host.accounts, host.reactor)
        for endpoint in config.listen.lmtp:
            factory = LMTPFactory(mda, config.limits, config.server.hostname, host.reactor)
            strports.service(endpoint, factory).setServiceParent(host)
    for role, endpoints in roles:
        for endpoint in endpoints:
            factory = ReceiveFactory(host, role)
            if role == "submissions":
                factory = implicit_tls(factory, host.tls)
            svc = strports.service(endpoint, factory)
            svc.setServiceParent(host)
    return host


def makeService(options):
    try:
        return build(options.config)
    except TLSNeeded as e:
        raise usage.UsageError(str(e))
