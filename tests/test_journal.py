"""The queue journal: durable appends, lazy ones, replay, torn tails, compaction."""
import os

from twisted.internet import defer, task

from mailsys.journal import Journal, encode, replay, rewrite


def journal(tmp_path, clock):
    calls = []

    def run(f, *args):
        calls.append(args)
        return defer.maybeDeferred(f, *args)

    j = Journal(str(tmp_path / "queue.jnl"), clock, run=run)
    j.open()
    return j, calls


def test_durable_append_is_on_disk_when_it_fires(tmp_path):
    clock = task.Clock()
    j, calls = journal(tmp_path, clock)
    fired = []
    j.append({"id": "A", "r": 0, "s": "sent"}).addCallback(fired.append)
    assert fired == [None] and len(calls) == 1
    assert replay(j.path) == [{"id": "A", "r": 0, "s": "sent"}]
    j.close()


def test_lazy_records_wait_for_company_or_a_second(tmp_path):
    clock = task.Clock()
    j, calls = journal(tmp_path, clock)
    j.append({"id": "A", "r": 0, "s": "deferred"}, durable=False)
    assert calls == [] and replay(j.path) == []
    clock.advance(1.0)
    assert len(calls) == 1 and replay(j.path) == [{"id": "A", "r": 0, "s": "deferred"}]
    j.append({"id": "B", "next": 5}, durable=False)
    j.append({"id": "B", "r": 0, "s": "sent"})          # carries the lazy one along
    assert len(calls) == 2
    assert replay(j.path)[1:] == [{"id": "B", "next": 5}, {"id": "B", "r": 0, "s": "sent"}]
    clock.advance(5)
    assert len(calls) == 2
    j.close()


def manual(tmp_path, clock):
    """A journal whose thread work is done by the test: ``finish()`` runs the
    oldest write and fires its Deferred, as the reactor would later."""
    pending = []

    def run(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    def finish():
        d, f, args = pending.pop(0)
        try:
            result = f(*args)
        except Exception as e:    # noqa: BLE001 - handed back like a thread's failure
            d.errback(e)
        else:
            d.callback(result)

    j = Journal(str(tmp_path / "queue.jnl"), clock, run=run)
    j.open()
    return j, pending, finish


def test_lazy_record_appended_during_a_write_still_waits(tmp_path):
    """The queue appends a message's lazy "done" from the callback of its
    durable "sent": that must not cost a write and fdatasync of its own."""
    clock = task.Clock()
    j, pending, finish = manual(tmp_path, clock)
    j.append({"id": "A", "r": 0, "s": "sent"}).addCallback(
        lambda _: j.append({"id": "A", "done": True}, durable=False))
    finish()
    assert pending == [] and replay(j.path) == [{"id": "A", "r": 0, "s": "sent"}]
    j.append({"id": "B", "r": 0, "s": "sent"})           # the next durable one carries it
    finish()
    assert pending == []
    assert replay(j.path)[1:] == [{"id": "A", "done": True}, {"id": "B", "r": 0, "s": "sent"}]
    j.append({"id": "C", "done": True}, durable=False)   # alone: written within a second
    clock.advance(0.9)
    assert pending == []
    clock.advance(0.1)
    finish()
    assert replay(j.path)[-1] == {"id": "C", "done": True}
    assert pending == [] and clock.getDelayedCalls() == []
    j.close()


def test_lazy_record_appended_while_the_thread_writes_goes_within_a_second(tmp_path):
    clock = task.Clock()
    j, pending, finish = manual(tmp_path, clock)
    j.append({"id": "A", "r": 0, "s": "sent"})
    j.append({"id": "A", "next": 7}, durable=False)      # while A is being written
    assert clock.getDelayedCalls() == []
    finish()
    assert pending == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    finish()
    assert replay(j.path) == [{"id": "A", "r": 0, "s": "sent"}, {"id": "A", "next": 7}]
    j.close()


def test_durable_record_appended_during_a_write_goes_next(tmp_path):
    clock = task.Clock()
    j, calls = journal(tmp_path, clock)
    fired = []
    j.append({"id": "A", "r": 0, "s": "sent"}).addCallback(
        lambda _: j.append({"id": "B", "r": 0, "s": "sent"}).addCallback(fired.append))
    assert len(calls) == 2 and fired == [None]
    assert [r["id"] for r in replay(j.path)] == ["A", "B"]
    j.close()


def test_close_writes_what_is_still_buffered(tmp_path):
    clock = task.Clock()
    j, calls = journal(tmp_path, clock)
    j.append({"id": "C", "next": 9}, durable=False)
    j.close()
    assert replay(j.path) == [{"id": "C", "next": 9}]


def test_replay_stops_at_a_torn_or_corrupt_tail(tmp_path):
    path = str(tmp_path / "j")
    good = encode({"id": "A", "done": True})
    second = encode({"id": "B", "done": True})
    with open(path, "wb") as f:
        f.write(good + second[:-3])
    assert replay(path) == [{"id": "A", "done": True}]
    with open(path, "wb") as f:
        f.write(good + second[:-1] + b"X")
    assert replay(path) == [{"id": "A", "done": True}]
    assert replay(str(tmp_path / "missing")) == []


def test_rewrite_replaces_atomically(tmp_path):
    path = str(tmp_path / "j")
    rewrite(path, [{"id": "A", "r": 0, "s": "deferred"}])
    rewrite(path, [{"id": "B", "done": True}])
    assert replay(path) == [{"id": "B", "done": True}]
    assert sorted(os.listdir(tmp_path)) == ["j"]
