"""``twistd mailsys``: options and the MultiService wiring every role together.

Configuration is loaded and validated before anything listens: a bad file makes
twistd refuse to start with the same ``FILE:LINE: key: problem`` lines that
``mailsys config check`` prints.

The twistd process is worker 0.  It takes the state directory's lock, recovers
the spool, opens every listening socket, then starts ``server.workers - 1``
more worker processes (mailsys.workers) that inherit the sockets and serve them
too; see docs/processes.rst.
"""
import fcntl
import math
import os
import time

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger
from twisted.python import usage

from mailsys.config import ConfigError, ConfigFileError, load, workers as worker_count

log = Logger(namespace="mailsys")

LOCK_WAIT = 10.0   # seconds to wait for a previous instance's processes to be gone
QUEUE_LMTP = "lmtp-queue"   # the role of the queue's own socket to the MDA workers
RECEIVE_ROLES = ("mta", "submission", "submissions")
LMTP_SESSIONS = 40   # concurrent LMTP deliveries from the queue to the MDA


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "configuration file (default: $MAILSYS_CONFIG, else the embedded default)"],
    ]

    def postOptions(self):
        """Load the configuration and the files it names as ``mailsys config
        check`` does.  Every refusal is a UsageError raised here: twistd turns one
        from parseOptions into its message and exit status 1, but lets one from
        makeService out as a traceback."""
        self.path = self["config"] or os.environ.get("MAILSYS_CONFIG") or None
        try:
            self.config = load(self.path, check_files=True)
        except ConfigFileError as e:
            raise usage.UsageError(str(e))
        except ConfigError as e:
            raise usage.UsageError("configuration problems:\n" + str(e))


class TLSNeeded(Exception):
    pass


class StateLocked(Exception):
    pass


def _refuse_listener(failure, role, endpoint):
    """A listener that cannot be opened (the port is taken, no permission for a
    port below 1024, an address this host does not have) stops the start in one
    sentence, as a bad configuration does, instead of twistd's traceback.  It is
    decided only at bind time, so ``mailsys config check`` cannot see it."""
    from twisted.internet.error import CannotListenError

    err = failure.value
    if not isinstance(err, CannotListenError):
        failure.raiseException()
    reason = getattr(err.socketError, "strerror", None) or str(err.socketError)
    where = f"{err.interface or '*'}:{err.port}" if err.port is not None else err.interface
    name = {QUEUE_LMTP: "the queue's LMTP socket"}.get(role, f"listen.{role}")
    raise SystemExit(f"mailsys: cannot start: {name} {endpoint}: cannot listen on {where}: "
                     f"{reason}; stop what uses it or change {name}")


class MailHost(service.MultiService):
    """Owns the shared state (spool, accounts, limits) of the listeners of one process."""

    def __init__(self, config, reactor=None, *, worker=0, nworkers=1):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        from mailsys.accounts import Accounts
        from mailsys.auth import FailureThrottle, make_portal
        from mailsys.rdns import ReverseLookup
        from mailsys.receive import ConnectionLimiter
        from mailsys.spool import Spool

        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.worker = worker
        self.nworkers = nworkers
        self.local_domains = frozenset(config.domains.local)
        self.relay_domains = frozenset(config.domains.relay)
        self.mynetworks = config.relay.mynetworks
        # Each process enforces its share of the total (the kernel spreads
        # connections over the processes accepting on a socket), but the whole
        # per-IP limit: the spread is uneven over a few connections, and a busy
        # peer refused early would be worse than one let in twice over.
        self.limiter = ConnectionLimiter(max(1, math.ceil(config.limits.connections / nworkers)),
                                         config.limits.connections_per_ip)
        self.rdns = ReverseLookup(reactor, reactor, config.dns.nameservers, config.dns.timeout)
        # check_interval=0: two stat() calls per lookup cost microseconds, and an
        # account added with `mailsys user add` must work at once.
        self.accounts = Accounts(config.accounts.users, config.accounts.aliases,
                                 config.domains.local, clock=reactor, check_interval=0)
        self.spool = Spool(os.path.join(config.server.state_dir, "spool"), reactor, worker=worker)
        self._relay_cache = {}
        self.tls = self._load_tls()
        self.portal = make_portal(self.accounts, reactor)
        self.auth_throttle = FailureThrottle(reactor)
        self.listeners = []      # (role, endpoint string, factory)
        self.ports = []          # listening ports of this process, same order
        self.adopt = None        # worker processes: [(role, endpoint, fd, family)]
        self.lock_fd = None
        self.pool = None
        self.queue = None
        self.journal = None
        self.remote = None          # worker 0: the outbound courier (mailsys.couriers.remote)
        self.lmtp = None            # worker 0: the LMTP courier to our MDA (mailsys.couriers.lmtp)
        self.pickup = None          # worker 0: the maildrop reader (mailsys.maildrop)
        self.control_ports = []
        self.notify_parent = None   # worker processes: a line to worker 0 (mailsys.workers)
        self.mda = None             # the MDA behind listen.lmtp, if any (build())
        self.steering = None        # a worker storing the queue's mail (mailsys.steering)

    def _load_tls(self):
        """The TLS context for every role, or None: STARTTLS is then not offered.

        The embedded default makes itself a self-signed certificate on first
        start so a development host offers STARTTLS at once (CONTRACT section 4).
        """
        from mailsys.config import EMBEDDED_SOURCE
        from mailsys.tls import ServerTLS, write_self_signed

        cfg = self.config.tls
        if (self.config.source == EMBEDDED_SOURCE and self.worker == 0
                and not os.path.exists(cfg.certificate)):
            write_self_signed(self.config.server.hostname, cfg.certificate, cfg.key)
            log.info("wrote a self-signed certificate to {path}", path=cfg.certificate)
        if not (os.path.exists(cfg.certificate) and os.path.exists(cfg.key)):
            if self.config.listen.submissions:
                raise TLSNeeded(f"listen.submissions needs a certificate, but {cfg.certificate} "
                                f"or {cfg.key} does not exist; run 'mailsys tls self-signed' "
                                f"or point [tls] at your certificate")
            if self.worker == 0:
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

    # -- start and stop -------------------------------------------------------------

    def privilegedStartService(self):
        # Listening happens here, before startService (and before twistd drops
        # privileges): recover the spool first so no mail arrives half-recovered.
        state = self.config.server.state_dir
        os.makedirs(state, mode=0o700, exist_ok=True)
        if self.adopt is None:
            try:
                self._lock_state(state)
            except StateLocked as e:
                raise SystemExit(f"mailsys: cannot start: {e}")
            for role, endpoint, _ in self.listeners:
                if role in ("lmtp", QUEUE_LMTP):
                    _remove_stale_unix_socket(endpoint)
        self.spool.open(everything=self.adopt is None)
        if self.adopt is None:
            self._load_queue()
            self._listen_control()
            from mailsys import maildrop

            maildrop.prepare(self.config)
        if self.adopt is None:
            for role, endpoint, factory in self.listeners:
                d = endpoints.serverFromString(self.reactor, endpoint).listen(factory)
                failure = []
                d.addCallbacks(self.ports.append, failure.append)
                if failure:
                    _refuse_listener(failure[0], role, endpoint)
        else:
            for (role, endpoint, fd, family), (_, _, factory) in zip(self.adopt, self.listeners):
                self.ports.append(adopt_port(self.reactor, fd, family, factory))
                os.close(fd)
            if self.mda is not None and any(role == QUEUE_LMTP for role, _, _ in self.listeners):
                # This worker stores the queue's deliveries: while it is behind,
                # the others take the new connections (mailsys.steering).
                from mailsys.steering import AcceptSteering

                self.steering = AcceptSteering(self.reactor, [
                    port for (role, _, _), port in zip(self.listeners, self.ports)
                    if role in RECEIVE_ROLES])
                self.mda.batcher.on_load = self.steering.load
        super().privilegedStartService()

    def _load_queue(self):
        """Worker 0 owns the queue (mailsys.queue.open_queue) and hears of each
        message spooled from now on."""
        from mailsys.queue import open_queue

        lmtp = None
        if self.config.listen.lmtp:
            from mailsys.couriers.lmtp import LMTPCourier

            # 40 sessions: the MDA commits each batch with one flush, so more
            # concurrent deliveries make bigger batches (bench/e2e.py: 4k-20 went
            # from 220 to 256 msg/s over 10 sessions on this machine kind).
            # With other workers, the queue's own socket to them (see build()).
            inside = [e for role, e, _ in self.listeners if role == QUEUE_LMTP]
            lmtp = self.lmtp = LMTPCourier(self.reactor, (inside or self.config.listen.lmtp)[0],
                                           self.config.server.hostname, max_sessions=LMTP_SESSIONS)
        from mailsys.couriers.remote import from_config

        # Relay domains and every other non-local domain go out this way.
        self.remote = from_config(self.reactor, self.config)
        self.queue, self.journal = open_queue(self.config, self.spool, self.reactor, lmtp=lmtp,
                                              remote=self.remote)
        self.spool.on_commit.append(self.queue.add)
        self.spool.on_close.append(self.queue.segment_closed)

    def _listen_control(self):
        """``mailsys queue`` and ``mailsys sendmail`` reach worker 0 here."""
        from mailsys import control

        for d in control.listen(self, self.reactor):
            failure = []
            d.addCallbacks(self.control_ports.append, failure.append)
            if failure:
                failure[0].raiseException()

    def request_flush(self, domain):
        """ETRN: the queue lives in worker 0; another worker forwards the request."""
        if self.queue is not None:
            self.queue.flush(domain)
        elif self.notify_parent is not None:
            self.notify_parent({"flush": domain})

    def submit_local(self, sender, recipients, message, *, uid=None, smtputf8=False, dsn=None):
        """Spool a message injected by ``mailsys sendmail`` (already CRLF).  Fires
        with the control answer once it is durable."""
        from mailsys.control import envelope_for_local
        from mailsys.receive import _now_rfc5322

        hostname = self.config.server.hostname
        qid = self.spool.ids.next()
        who = f"from userid {uid}" if uid is not None else "local"
        received = (f"Received: by {hostname} (mailsys, {who})\r\n\tid {qid}"
                    + (f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else "")
                    + f"; {_now_rfc5322()}\r\n")
        writer = self.spool.new_message(qid)
        writer.write(received.encode("utf-8"))
        writer.write(message)
        envelope = envelope_for_local(sender, recipients, uid, hostname, dsn)
        if smtputf8:
            envelope["params"]["smtputf8"] = True
        if not message.isascii():
            envelope["params"]["body"] = "8BITMIME"
        d = self.spool.commit(writer, envelope)

        def queued(entry):
            from mailsys.receive import log as receive_log

            receive_log.info(f"{qid}: uid={uid}", qid=qid, uid=uid)
            receive_log.queued(qid, sender, entry.message_size, len(recipients))
            return {"ok": True, "id": qid}

        def failed(f):
            log.error("{qid}: spool write failed: {error}", qid=qid, error=f.getErrorMessage())
            return {"ok": False, "error": f"the spool could not store the message: "
                                          f"{f.getErrorMessage()}"}

        return d.addCallbacks(queued, failed)

    def _lock_state(self, state):
        """One mail host per state directory.  Worker processes inherit the lock,
        so a restart after kill -9 also waits until the old workers are gone."""
        fd = os.open(os.path.join(state, "mailsys.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StateLocked(f"another mailsys is running on {state} "
                                      f"(it holds {state}/mailsys.lock); stop it first")
                time.sleep(0.1)
        self.lock_fd = fd

    def startService(self):
        super().startService()
        from mailsys.dispatch import lean_dispatch

        self.rdns.start()     # its own threads (mailsys.rdns), stopped at reactor shutdown

        lean_dispatch(self.reactor)    # docs/processes.rst: no legacy log context per event
        if self.queue is not None:
            self.queue.startService()
            from mailsys.maildrop import Pickup

            self.pickup = Pickup(self, self.reactor)
            self.pickup.start()
        if self.adopt is None and self.nworkers > 1:
            from mailsys.workers import WorkerPool

            self.pool = WorkerPool(self, self.nworkers - 1)
            self.pool.start()
        if self.worker == 0:
            from mailsys.logs import speed_up_log_files

            speed_up_log_files(reactor=self.reactor)
            log.info("mailsys started: {hostname}, state in {state_dir}, {n} worker process(es)",
                     hostname=self.config.server.hostname, state_dir=self.config.server.state_dir,
                     n=self.nworkers)

    def serve_lmtp(self, serving):
        """Whether worker 0 accepts on the queue's LMTP socket (the WorkerPool
        turns this off while another worker runs; see build())."""
        if self.adopt is not None:
            return
        for (role, _, _), port in zip(self.listeners, self.ports):
            if role == QUEUE_LMTP:
                if serving:
                    self.reactor.addReader(port)
                else:
                    self.reactor.removeReader(port)

    def stopService(self):
        from twisted.internet import defer

        # Worker 0 owns the listening sockets: a worker closing an adopted unix
        # socket would also remove its file (twice, with worker 0's own removal).
        if self.adopt is None:
            waits = [defer.maybeDeferred(p.stopListening) for p in self.ports + self.control_ports]
            self.control_ports = []
        else:
            # Out of the reactor before its shutdown disconnects (and unlinks) them;
            # the descriptors close with the process.
            if self.steering is not None:
                self.steering.stop()
            waits = []
            for p in self.ports:
                self.reactor.removeReader(p)
        self.ports = []
        if self.pool is not None:
            waits.append(self.pool.stop())
        waits.append(defer.maybeDeferred(super().stopService))
        if self.queue is not None and self.queue.running:
            waits.append(defer.maybeDeferred(self.queue.stopService))
        if self.remote is not None:
            self.remote.idle()        # QUIT to every pooled outbound session
        if self.lmtp is not None:
            self.lmtp.idle()          # and to the idle sessions to our MDA
        if self.pickup is not None:
            self.pickup.stop()
        d = defer.DeferredList(waits)

        def closed(result):
            self.spool.close()
            if self.journal is not None:
                self.journal.close()
            return None

        return d.addBoth(closed)


def private_unix(endpoint):
    """``endpoint`` with ``mode=0600`` added when it is a unix socket that names no
    mode of its own.

    LMTP asks for no authentication: whoever can connect can put mail in any
    mailbox, with any headers.  Twisted creates unix sockets 0666, and the state
    directory they live in by default is 0711 (so local users reach
    ``public/submit.sock``), so the MDA's socket is made for the service user
    alone unless the operator says otherwise (``mode=666`` in Postfix's
    ``private/`` directory, say: docs/mda.rst)."""
    from mailsys.couriers.lmtp import split_description

    kind, sep, rest = endpoint.partition(":")
    if kind.strip().lower() != "unix" or not sep:
        return endpoint
    _, kwargs = split_description(rest)
    if "mode" in kwargs:
        return endpoint
    return f"{endpoint}:mode=0600"


def adopt_port(reactor, fd, family, factory):
    """Listen on the inherited socket ``fd`` (worker processes, mailsys.workers).

    Twisted's ``adoptStreamPort`` chmods a unix socket's file to 0666 as if it
    had just bound it, which would open ``listen.lmtp`` (``mode=0600``, say) and
    the queue's own 0600 socket to every local user the moment a worker starts.
    The file already has the mode worker 0 gave it, so a unix socket is adopted
    keeping that mode."""
    import socket
    import stat

    if family != socket.AF_UNIX:
        return reactor.adoptStreamPort(fd, family, factory)
    from twisted.internet import unix

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(fd))
    try:
        path = probe.getsockname()
    finally:
        probe.close()
    mode = None
    if isinstance(path, str) and path and path[0] != "\0":     # not abstract
        mode = stat.S_IMODE(os.stat(path).st_mode)
    port = unix.Port._fromListeningDescriptor(reactor, fd, factory)
    if mode is not None:
        port.mode = mode    # what startListening gives the file: what it has
    port.startListening()
    return port


def _remove_stale_unix_socket(endpoint):
    """A socket file left by a killed server blocks the next bind: remove it
    when nothing answers on it (a live server keeps its socket)."""
    import socket
    import stat

    if not endpoint.startswith("unix:"):
        return
    path = endpoint[5:].split(":")[0].replace("\\\\:", ":")
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


def build(config, reactor=None, *, worker=0, nworkers=None, config_path=None):
    """The mail host of one process with every configured role's factory."""
    from mailsys.receive import ReceiveFactory, implicit_tls

    if nworkers is None:
        nworkers = worker_count(config)
    host = MailHost(config, reactor, worker=worker, nworkers=nworkers)
    host.config_path = config_path
    if config.listen.lmtp:
        from mailsys.mda.lmtp import LMTPFactory, MDA, mda_limits

        mda = host.mda = MDA(config, host.accounts, host.reactor, worker=worker, spool=host.spool)
        limits = mda_limits(config.limits)
        for endpoint in config.listen.lmtp:
            factory = LMTPFactory(mda, limits, config.server.hostname, host.reactor)
            host.listeners.append(("lmtp", private_unix(endpoint), factory))
        if nworkers > 1:
            # The queue's deliveries reach the MDA through a socket of their own,
            # served by the other workers only (worker 0 takes it over while none
            # runs: MailHost.serve_lmtp).  The courier keeps its sessions open, and
            # on a shared listener the kernel gives a new connection to whichever
            # process accepts first, usually worker 0, which just connected: every
            # delivery's MDA work would pile onto the process that already runs the
            # queue, the courier, the journal and the log.  listen.lmtp itself stays
            # served by every process, for other MTAs (docs/processes.rst).
            path = os.path.join(config.server.state_dir, "lmtp-queue.sock")
            factory = LMTPFactory(mda, limits, config.server.hostname, host.reactor)
            host.listeners.append((QUEUE_LMTP, f"unix:{quoteStringArgument(path)}:mode=0600",
                                   factory))
    roles = [("mta", config.listen.mta), ("submission", config.listen.submission),
             ("submissions", config.listen.submissions)]
    for role, endpoints_ in roles:
        for endpoint in endpoints_:
            factory = ReceiveFactory(host, role)
            if role == "submissions":
                factory = implicit_tls(factory, host.tls)
            host.listeners.append((role, endpoint, factory))
    if config.listen.pop3 or config.listen.pop3s:
        from mailsys.pop3 import listeners as pop3_listeners

        if config.listen.pop3s and host.tls is None:
            raise TLSNeeded(f"listen.pop3s needs a certificate, but {config.tls.certificate} "
                            f"or {config.tls.key} does not exist; run 'mailsys tls self-signed' "
                            f"or point [tls] at your certificate")
        host.listeners.extend(pop3_listeners(host))
    return host


def makeService(options):
    """The mail host; Options.postOptions has already refused what it can.

    A file that changed since (or a problem only building finds) still ends
    in one sentence: twistd would print a UsageError raised here as a
    traceback, so the message goes to stderr and the process exits 1, as
    twistd does for its own usage errors."""
    from mailsys.accounts import AccountsError
    from mailsys.tls import TLSError

    try:
        return build(options.config, config_path=options.path)
    except (TLSNeeded, AccountsError, TLSError) as e:
        raise SystemExit(f"mailsys: cannot start: {e}")
