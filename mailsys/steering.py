"""Inflow steering: a worker busy delivering stops taking new SMTP connections.

With more than one process, every worker accepts on the SMTP listeners and
the kernel spreads new connections over whichever processes are waiting in
``accept``; the other workers (not worker 0) also run the MDA for the queue's
deliveries.  Under a sustained burst that worker is the busiest process on
the machine: it receives its share of the mail *and* stores all of it, so the
MDA falls behind, the queue piles up in worker 0, and the mail that was
accepted in seconds reaches the mailboxes only long after
(``bench/e2e.py``: the last tenth of the files arrived seconds after the last
message was accepted, with a core half idle meanwhile).

Postfix solves the same problem with ``in_flow_delay``: its SMTP server
pauses before taking a message while the queue manager is behind.  Here a
worker whose MDA has :data:`HIGH` or more deliveries in flight stops
accepting on its receiving listeners (mta, submission, submissions) until it
is down to :data:`LOW`; connections it does not take are accepted by the
other processes (worker 0 never pauses), so no client is refused or kept
waiting beyond the kernel's listen queue, and sessions already open carry on.
Measured (docs/performance.rst): end to end 4k-20 went from 389-398 to
465-505 messages/s in alternating runs, and server CPU per message down by a
sixth, since a backlog makes every message dearer.
"""

HIGH = 16   # MDA deliveries in flight at which a worker stops accepting
LOW = 4     # ... and at or below which it accepts again


class AcceptSteering:
    """Pauses and resumes the reactor's reading of ``ports`` (listening ports)
    as :meth:`load` reports the MDA's deliveries in flight."""

    def __init__(self, reactor, ports, high=HIGH, low=LOW):
        self.reactor = reactor
        self.ports = list(ports)
        self.high, self.low = high, low
        self.paused = False
        self.stopped = False
        self.pauses = 0     # how often (for tests and curiosity)

    def load(self, in_flight):
        if self.stopped or not self.ports:
            return
        if not self.paused and in_flight >= self.high:
            self.paused = True
            self.pauses += 1
            for port in self.ports:
                self.reactor.removeReader(port)
        elif self.paused and in_flight <= self.low:
            self.paused = False
            for port in self.ports:
                self.reactor.addReader(port)

    def stop(self):
        """The process is stopping (its listeners leave the reactor for good):
        no more changes."""
        self.stopped = True
