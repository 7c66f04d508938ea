"""mailsys.steering: a worker whose MDA is behind stops accepting new SMTP
connections until it has caught up; and the MDA's batcher reports its load."""
from twisted.internet import defer

from mailsys.mda.lmtp import DeliveryBatcher
from mailsys.steering import AcceptSteering


class Reactor:
    def __init__(self):
        self.reading = set()
        self.calls = []

    def addReader(self, port):
        self.calls.append(("add", port))
        self.reading.add(port)

    def removeReader(self, port):
        self.calls.append(("remove", port))
        self.reading.discard(port)


def test_pauses_at_high_and_resumes_at_low_with_hysteresis():
    r = Reactor()
    r.reading = {"mta", "submission"}
    s = AcceptSteering(r, ["mta", "submission"], high=4, low=1)
    for n in (1, 2, 3):
        s.load(n)
    assert r.calls == [] and not s.paused
    s.load(4)
    assert r.reading == set() and s.paused and s.pauses == 1
    for n in (5, 3, 2, 4):          # between the marks: no flapping
        s.load(n)
    assert r.calls == [("remove", "mta"), ("remove", "submission")]
    s.load(1)
    assert r.reading == {"mta", "submission"} and not s.paused
    s.load(2)
    s.load(4)
    assert s.pauses == 2 and r.reading == set()


def test_nothing_changes_once_stopped_or_without_ports():
    r = Reactor()
    s = AcceptSteering(r, ["mta"], high=2, low=0)
    s.load(2)
    s.stop()
    s.load(0)                       # a stopping worker's listeners stay out
    assert r.calls == [("remove", "mta")]
    empty = AcceptSteering(r, [], high=1, low=0)
    empty.load(5)
    assert r.calls == [("remove", "mta")] and not empty.paused


def test_the_batcher_reports_deliveries_in_flight():
    runs = []

    def run(f, stores, jobs, log):
        d = defer.Deferred()
        runs.append((d, jobs))
        return d

    loads = []
    b = DeliveryBatcher(reactor=None, stores={}, run=run)
    b.on_load = loads.append
    results = [b.submit([], b"m%d" % i, "s@x") for i in range(3)]
    assert loads == [1, 2, 3] and b.in_flight == 3
    d, jobs = runs.pop(0)           # the first batch took message 0; 1 and 2 wait
    assert len(jobs) == 1
    d.callback([[]])
    assert loads[-1] == 2 and b.in_flight == 2
    d, jobs = runs.pop(0)           # the next batch: both waiting ones together
    assert len(jobs) == 2
    d.callback([[], []])
    assert loads[-1] == 0 and b.in_flight == 0
    assert all(r.called for r in results)
