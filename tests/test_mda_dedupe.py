"""Exactly once after a crash: XQID/XREDELIVERY, the MDA's delivery log, and the
redelivery check (mailsys.mda.dedupe).  StringTransport, task.Clock, tmp dirs;
the stores are the real Maildir and mbox ones."""
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.accounts import Expansion, User
from mailsys.couriers.lmtp import LMTPClientProtocol
from mailsys.delivery import Delivered
from mailsys.mda import dedupe
from mailsys.mda.dedupe import DeliveryLog, compact, qid_time
from mailsys.mda.lmtp import MDA, LMTPFactory, deliver_batch
from mailsys.mda.maildir import MaildirStore
from mailsys.mda.mbox import MboxStore
from mailsys.mda.memory import MemoryStore
from mailsys.smtp.params import ParamError, parse_mail_params
from mailsys.smtp.server import SMTPServerProtocol
from mailsys.spool import QueueIds

QID = "1985091482119000A"
OTHER = "1985091482119400B"
MSG = b"Subject: once\r\nMessage-ID: <once@example.org>\r\n\r\nexactly once\r\n"
MSG_LF = MSG.replace(b"\r\n", b"\n")     # as the MDA hands it to the stores
LIMITS = SimpleNamespace(message_size=10000, recipients=100, command_timeout=300,
                         data_timeout=600, auth_failures=3)


class Accounts:
    users = {
        "joe@example.com": User("joe@example.com", "{ARGON2ID}x"),
        "ann@example.com": User("ann@example.com", "{ARGON2ID}x"),
        "box@example.com": User("box@example.com", "{ARGON2ID}x", store="mbox"),
    }
    aliases = {"team@example.com": ("joe@example.com", "ann@example.com")}

    def user(self, address):
        return self.users.get(address.lower())

    def expand(self, address):
        if address.lower() in self.aliases:
            return Expansion(local_users=self.aliases[address.lower()])
        user = self.user(address)
        return Expansion(local_users=(user.address,)) if user else Expansion()


def make_config(tmp_path, state=True):
    config = SimpleNamespace(
        mailbox=SimpleNamespace(root=str(tmp_path / "mail"), default_store="maildir", quota=0),
        domains=SimpleNamespace(local=("example.com",)))
    if state:
        config.server = SimpleNamespace(state_dir=str(tmp_path / "state"))
    return config


def make_mda(tmp_path, worker=0, state=True, stores=None):
    stores = stores or {"maildir": MaildirStore(flush=lambda paths: None),
                        "mbox": MboxStore(lock_timeout=0.2)}
    return MDA(make_config(tmp_path, state), Accounts(), reactor=None, stores=stores,
               worker=worker, run=defer.maybeDeferred)


def connect(mda):
    proto = LMTPFactory(mda, LIMITS, "mda.example.com", task.Clock()).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    return proto, t


def lmtp(mda, mail_params, rcpts, message=MSG):
    """One LMTP transaction; the replies after the final dot (one per accepted RCPT)."""
    proto, t = connect(mda)
    proto.dataReceived(b"LHLO queue.example.org\r\n")
    t.clear()
    data = f"MAIL FROM:<a@example.org>{mail_params}\r\n".encode()
    data += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n"
    proto.dataReceived(data + message + b".\r\n")
    out = t.value().decode().split("\r\n")[:-1]
    assert out[0] == "250 2.1.0 Ok", out
    assert out[len(rcpts) + 1].startswith("354"), out
    return out[len(rcpts) + 2:]


def new_files(tmp_path, user="joe"):
    d = tmp_path / "mail" / "example.com" / user / "Maildir" / "new"
    return sorted(os.listdir(d)) if d.exists() else []


def log_records(tmp_path, worker=0):
    path = tmp_path / "state" / "mda" / f"delivered-{worker}.log"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


# --- the MAIL parameters and their advertisement --------------------------------------------

def test_xqid_parameters_are_parsed_where_advertised():
    p = parse_mail_params(f"SIZE=10 XQID={QID} XREDELIVERY", 0, ("XQID",))
    assert (p.xqid, p.redelivery, p.size) == (QID, True, 10)
    assert p.as_dict() == {"size": 10}          # never into a queue record
    p = parse_mail_params(f"xqid={QID}", 0, ("XQID",))
    assert (p.xqid, p.redelivery) == (QID, False)


@pytest.mark.parametrize("text", [
    "XQID", "XQID=", "XQID=1985091482119000a", "XQID=G985091482119000A", "XQID=" + "A" * 21,
    "XQID=19850914+2119000A", "XREDELIVERY", f"XQID={QID} XREDELIVERY=1",
])
def test_a_bad_xqid_is_501(text):
    with pytest.raises(ParamError) as e:
        parse_mail_params(text, 0, ("XQID",))
    assert (e.value.reply.code, e.value.reply.status) in ((501, "5.5.4"),)


@pytest.mark.parametrize("text", [f"XQID={QID}", "XREDELIVERY"])
def test_xqid_is_unknown_where_not_advertised(text):
    with pytest.raises(ParamError) as e:
        parse_mail_params(text, 0)
    assert (e.value.reply.code, e.value.reply.status) == (555, "5.5.4")


def test_the_mda_advertises_xqid_only_with_a_state_dir(tmp_path):
    proto, t = connect(make_mda(tmp_path))
    proto.dataReceived(b"LHLO x\r\n")
    assert b"250-XQID\r\n250 HELP\r\n" in t.value()
    proto, t = connect(make_mda(tmp_path, state=False))
    proto.dataReceived(b"LHLO x\r\n")
    assert b"XQID" not in t.value()
    proto.dataReceived(f"MAIL FROM:<a@b.org> XQID={QID}\r\n".encode())
    assert t.value().endswith(b"555 5.5.4 Unsupported option: XQID\r\n")


def test_lmtp_answers_a_bad_xqid_with_501(tmp_path):
    proto, t = connect(make_mda(tmp_path))
    proto.dataReceived(b"LHLO x\r\n")
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@b.org> XQID=../../etc\r\nMAIL FROM:<a@b.org> XREDELIVERY\r\n")
    assert t.value() == (b"501 5.5.4 Bad XQID parameter\r\n"
                         b"501 5.5.4 XREDELIVERY needs XQID\r\n")


def test_smtp_roles_never_take_xqid(tmp_path):
    """Even with a handler that would offer it: the private keyword is LMTP's alone."""
    from tests.helpers import FakeHandler, limits

    handler = FakeHandler()
    handler.private_extensions = lambda proto: ("XQID",)
    proto = SMTPServerProtocol(handler, "mx.example.com", limits=limits(), clock=task.Clock())
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO x\r\n")
    assert b"XQID" not in t.value()
    t.clear()
    proto.dataReceived(f"MAIL FROM:<a@b.org> XQID={QID} XREDELIVERY\r\n".encode())
    assert t.value() == b"555 5.5.4 Unsupported option: XQID\r\n"


def courier_session(lhlo, params):
    clock = task.Clock()
    proto = LMTPClientProtocol("queue.example.org", "a@example.org", [("joe@example.com", {})],
                               MSG, params, clock=clock)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(b"220 mda.example.com LMTP\r\n")
    t.clear()
    proto.dataReceived(lhlo)
    return t.value().split(b"\r\n")[0]


LHLO_XQID = b"250-mda.example.com\r\n250-PIPELINING\r\n250-XQID\r\n250 HELP\r\n"
LHLO_FOREIGN = b"250-dovecot.example.com\r\n250-PIPELINING\r\n250 HELP\r\n"


def test_the_courier_sends_xqid_only_when_advertised():
    assert courier_session(LHLO_XQID, {"xqid": QID}) == f"MAIL FROM:<a@example.org> XQID={QID}".encode()
    assert courier_session(LHLO_XQID, {"xqid": QID, "xredelivery": True}) == (
        f"MAIL FROM:<a@example.org> XQID={QID} XREDELIVERY".encode())
    assert courier_session(LHLO_FOREIGN, {"xqid": QID, "xredelivery": True}) == (
        b"MAIL FROM:<a@example.org>")
    # Never an id that is not one of ours on the wire.
    assert courier_session(LHLO_XQID, {"xqid": "x y\r\nRSET"}) == b"MAIL FROM:<a@example.org>"


def test_courier_deliver_passes_the_queue_id_on():
    from twisted.internet.testing import MemoryReactorClock

    from mailsys.couriers.lmtp import LMTPCourier

    reactor = MemoryReactorClock()
    courier = LMTPCourier(reactor, "unix:/nonexistent/lmtp.sock", "queue.example.org")
    started = []
    courier._start = started.append
    courier.deliver("a@example.org", ["joe@example.com"], MSG, {}, qid=QID, redelivery=True)
    courier.deliver("a@example.org", ["joe@example.com"], MSG, {"body": "8BITMIME"}, qid="bad id")
    assert started[0].plan.params == {"xqid": QID, "xredelivery": True}
    assert started[1].plan.params == {"body": "8BITMIME"}


# --- the log ------------------------------------------------------------------------------

def test_log_records_are_found_across_workers_and_appends(tmp_path):
    d = str(tmp_path / "mda")
    w0, w1 = DeliveryLog(d, 0), DeliveryLog(d, 1)
    assert not os.path.exists(d)            # nothing is created before the first write
    assert w1.find(QID, "/m/joe") is None
    w0.write([(QID, "joe@example.com", "/m/joe", "name-1"), (QID, "ann@example.com", "/m/ann", "n2")])
    assert sorted(os.listdir(d)) == ["delivered-0.log"]
    assert w1.find(QID, "/m/joe") == "name-1"       # the other worker's file, loaded lazily
    w0.write([(OTHER, "box@example.com", "/m/box", [0, 100, 7])])
    assert w1.find(OTHER, "/m/box") == [0, 100, 7]  # appended after the load: read on a miss
    assert w1.find(OTHER, "/m/joe") is None
    w1.write([(OTHER, "joe@example.com", "/m/joe", "name-3")])
    assert w0.find(OTHER, "/m/joe") == "name-3"


def test_a_torn_tail_is_cut_before_the_next_record(tmp_path):
    d = tmp_path / "mda"
    d.mkdir()
    (d / "delivered-0.log").write_bytes(dedupe.encode(QID, "joe@example.com", "/m/joe", "a")
                                        + b'{"q":"1985')
    log = DeliveryLog(str(d), 0)
    log.write([(OTHER, "joe@example.com", "/m/joe", "b")])
    assert (d / "delivered-0.log").read_bytes().count(b"\n") == 2
    reader = DeliveryLog(str(d), 1)
    assert reader.find(QID, "/m/joe") == "a" and reader.find(OTHER, "/m/joe") == "b"


def test_a_long_running_log_is_rotated_and_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(dedupe, "ROTATE_BYTES", 200)
    now = [1000.0]
    d = str(tmp_path / "mda")
    log = DeliveryLog(d, 0, clock=lambda: now[0])
    reader = DeliveryLog(d, 1)
    first = [(f"{i:X}", "joe@example.com", "/m/joe", f"f{i}") for i in range(1, 5)]
    log.write(first)
    assert reader.find("1", "/m/joe") == "f1"       # read: the reader is now at the end of it
    log.write([("5", "joe@example.com", "/m/joe", "f5")])
    assert os.listdir(d) == ["delivered-0.log"]    # over the size, but too soon to rotate
    now[0] += dedupe.ROTATE_AGE
    log.write([("6", "joe@example.com", "/m/joe", "f6")])
    assert sorted(os.listdir(d)) == ["delivered-0.log", "delivered-0.old.log"]
    # A reader that had consumed the file now named .old reads both correctly.
    assert reader.find("5", "/m/joe") == "f5" and reader.find("6", "/m/joe") == "f6"
    assert DeliveryLog(d, 2).find("1", "/m/joe") == "f1"
    log.write([(f"{i:X}", "joe@example.com", "/m/joe", f"f{i}") for i in range(7, 12)])
    now[0] += dedupe.ROTATE_AGE
    log.write([("C", "joe@example.com", "/m/joe", "f12")])
    # The round before last is gone: records older than ROTATE_AGE were journaled long ago.
    fresh = DeliveryLog(d, 2)
    assert fresh.find("1", "/m/joe") is None and fresh.find("5", "/m/joe") is None
    assert fresh.find("6", "/m/joe") == "f6" and fresh.find("C", "/m/joe") == "f12"
    assert compact(d, {"7"}) == 1 and os.listdir(d) == ["delivered-0.old.log"]


def test_compaction_keeps_only_live_queue_ids(tmp_path):
    d = str(tmp_path / "mda")
    DeliveryLog(d, 0).write([(QID, "joe@example.com", "/m/joe", "a"),
                             (OTHER, "joe@example.com", "/m/joe", "b")])
    DeliveryLog(d, 1).write([(OTHER, "ann@example.com", "/m/ann", "c")])
    with open(os.path.join(d, "delivered-1.log"), "ab") as f:
        f.write(b"garbage\n")
    assert compact(d, {QID}) == 1
    assert os.listdir(d) == ["delivered-0.log"]
    assert DeliveryLog(d, 2).find(QID, "/m/joe") == "a"
    assert DeliveryLog(d, 2).find(OTHER, "/m/joe") is None
    assert compact(d, set()) == 0 and os.listdir(d) == []
    assert compact(str(tmp_path / "missing"), {QID}) == 0


def test_open_queue_compacts_the_delivery_logs(tmp_path, monkeypatch):
    from mailsys import queue as queue_module
    from mailsys.spool import Spool

    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    DeliveryLog(str(state / "mda"), 0).write([(QID, "joe@example.com", "/m/joe", "a"),
                                              (OTHER, "joe@example.com", "/m/joe", "b")])

    def load(self, entries, records):
        self.messages[QID] = SimpleNamespace(qid=QID)    # the one message still queued
        return [], set()

    monkeypatch.setattr(queue_module.QueueManager, "load", load)
    config = SimpleNamespace(server=SimpleNamespace(state_dir=str(state), hostname="mx.example.com"),
                             domains=SimpleNamespace(local=("example.com",)))
    spool = Spool(str(state / "spool"), task.Clock(), fsync=False)
    spool.open()
    _, journal = queue_module.open_queue(config, spool, task.Clock())
    journal.close()
    spool.close()
    assert [r["q"] for r in log_records(tmp_path)] == [QID]


def test_qid_time_reads_our_queue_ids():
    qid = QueueIds(clock=lambda: 1795786044.5, worker=3).next()
    assert qid_time(qid) == pytest.approx(1795786044.5)
    assert qid_time("not hex") == 0.0


# --- deliveries and redeliveries through the MDA -----------------------------------------

def test_a_queue_id_delivery_is_logged_before_it_is_visible(tmp_path):
    seen = []

    def flush(paths):
        new = tmp_path / "mail" / "example.com" / "joe" / "Maildir" / "new"
        seen.append((list(paths), os.listdir(new) if new.exists() else [], log_records(tmp_path)))

    mda = make_mda(tmp_path, stores={"maildir": MaildirStore(flush=flush), "mbox": MboxStore()})
    assert lmtp(mda, f" XQID={QID}", ["joe@example.com"]) == ["250 2.0.0 Ok: delivered"]
    (name,) = new_files(tmp_path)
    _, (first_paths, visible, records), _ = seen    # the new Maildir's directories come first
    log_path = str(tmp_path / "state" / "mda" / "delivered-0.log")
    assert log_path in first_paths and visible == []        # one flush covers file and record
    assert records == [{"q": QID, "r": "joe@example.com",
                        "l": str(tmp_path / "mail" / "example.com" / "joe" / "Maildir"), "w": name}]


def test_no_queue_id_no_record(tmp_path):
    mda = make_mda(tmp_path)
    assert lmtp(mda, "", ["joe@example.com"]) == ["250 2.0.0 Ok: delivered"]
    assert log_records(tmp_path) == [] and not (tmp_path / "state" / "mda").exists()


def test_a_redelivery_that_finds_its_copy_is_not_stored_again(tmp_path):
    first = make_mda(tmp_path, worker=0)
    assert lmtp(first, f" XQID={QID}", ["joe@example.com", "ann@example.com"]) == [
        "250 2.0.0 Ok: delivered"] * 2
    # After a restart the recovered message may reach another worker process.
    again = make_mda(tmp_path, worker=1)
    assert lmtp(again, f" XQID={QID} XREDELIVERY", ["joe@example.com", "ann@example.com"]) == [
        "250 2.0.0 Ok: already delivered"] * 2
    assert len(new_files(tmp_path, "joe")) == 1 and len(new_files(tmp_path, "ann")) == 1
    # A reader moved it to cur/ with flags: still there.
    maildir = tmp_path / "mail" / "example.com" / "joe" / "Maildir"
    (name,) = new_files(tmp_path, "joe")
    os.rename(maildir / "new" / name, maildir / "cur" / (name + ":2,S"))
    assert lmtp(again, f" XQID={QID} XREDELIVERY", ["joe@example.com"]) == [
        "250 2.0.0 Ok: already delivered"]
    assert new_files(tmp_path, "joe") == [] and len(os.listdir(maildir / "cur")) == 1


def test_a_redelivery_delivers_where_the_copy_is_missing(tmp_path):
    mda = make_mda(tmp_path)
    lmtp(mda, f" XQID={QID}", ["team@example.com"])          # joe and ann, one recipient
    (lost,) = new_files(tmp_path, "ann")
    os.unlink(tmp_path / "mail" / "example.com" / "ann" / "Maildir" / "new" / lost)
    # The record alone is not enough: ann gets the copy she lacks, joe no second one.
    assert lmtp(make_mda(tmp_path, worker=1), f" XQID={QID} XREDELIVERY", ["team@example.com"]) == [
        "250 2.0.0 Ok: expanded to 2 recipients, already delivered"]
    assert len(new_files(tmp_path, "joe")) == 1
    (copy,) = new_files(tmp_path, "ann")
    assert copy != lost


def test_an_unknown_queue_id_or_a_plain_retry_delivers(tmp_path):
    mda = make_mda(tmp_path)
    assert lmtp(mda, f" XQID={QID} XREDELIVERY", ["joe@example.com"]) == ["250 2.0.0 Ok: delivered"]
    assert lmtp(mda, f" XQID={OTHER} XREDELIVERY", ["joe@example.com"]) == ["250 2.0.0 Ok: delivered"]
    # Without XREDELIVERY nobody looks: a message not recovered after a crash.
    assert lmtp(mda, f" XQID={QID}", ["joe@example.com"]) == ["250 2.0.0 Ok: delivered"]
    assert len(new_files(tmp_path)) == 3


def test_mbox_redelivery(tmp_path):
    mbox = tmp_path / "mail" / "example.com" / "box" / "mbox"
    store = MboxStore(lock_timeout=0.2)
    synced = []

    class Log(DeliveryLog):
        def sync(self):
            # The record is durable before the append is written.
            synced.append(os.path.getsize(mbox) if mbox.exists() else 0)
            super().sync()

    mda = make_mda(tmp_path, stores={"maildir": MaildirStore(), "mbox": store})
    mda.batcher.log = mda.delivery_log = Log(str(tmp_path / "state" / "mda"), 0)
    assert lmtp(mda, f" XQID={QID}", ["box@example.com"]) == ["250 2.0.0 Ok: delivered"]
    assert lmtp(mda, f" XQID={OTHER}", ["box@example.com"],
                MSG.replace(b"once", b"twice")) == ["250 2.0.0 Ok: delivered"]
    size = os.path.getsize(mbox)
    assert synced[0] == 0 and 0 < synced[1] < size
    rec = log_records(tmp_path)
    assert [r["w"][0] for r in rec] == [0, synced[1]] and rec[1]["w"][0] + rec[1]["w"][1] == size

    other = make_mda(tmp_path, worker=1, stores={"maildir": MaildirStore(), "mbox": store})
    assert lmtp(other, f" XQID={OTHER} XREDELIVERY", ["box@example.com"],
                MSG.replace(b"once", b"twice")) == ["250 2.0.0 Ok: already delivered"]
    assert os.path.getsize(mbox) == size and len(store.messages(str(mbox))) == 2
    # A different message now where the record points (the mbox was rewritten by a
    # reader): the CRC tells, and the copy is delivered again.
    data = mbox.read_bytes()
    mbox.write_bytes(data[:rec[1]["w"][0]] + data[rec[1]["w"][0]:].replace(b"twice", b"thrice"))
    assert lmtp(other, f" XQID={OTHER} XREDELIVERY", ["box@example.com"],
                MSG.replace(b"once", b"twice")) == ["250 2.0.0 Ok: delivered"]
    assert len(store.messages(str(mbox))) == 3


def test_deliver_batch_on_the_memory_store(tmp_path):
    store = MemoryStore()
    log = DeliveryLog(str(tmp_path / "mda"), 0)
    targets = [("joe@example.com", [("joe@example.com", "maildir", 0, "/m/joe")])]
    (first,) = deliver_batch({"maildir": store}, [(targets, MSG_LF, "a@b.org", QID, False)], log)
    assert first == [Delivered()]
    (again,) = deliver_batch({"maildir": store}, [(targets, MSG_LF, "a@b.org", QID, True)], log)
    assert again[0].reply.text == "Ok: already delivered"
    assert len(store.messages("/m/joe")) == 1
    # Old-style jobs (no queue id) still work, and never touch the log.
    (plain,) = deliver_batch({"maildir": store}, [(targets, MSG_LF, "a@b.org")], log)
    assert plain == [Delivered()] and len(store.messages("/m/joe")) == 2


def test_a_name_clash_in_new_is_recorded_under_the_new_name(tmp_path):
    store = MaildirStore(flush=lambda paths: None)
    counter = iter([1, 1, 2])
    store._unique = lambda size, vsize: f"100.M1P1Q{next(counter)}.h,S={size},W={vsize}"
    log = DeliveryLog(str(tmp_path / "mda"), 0)
    loc = str(tmp_path / "Maildir")
    item = (loc, b"", MSG_LF, 0, "a@b.org", None)
    assert store.deliver_many([item], log=log, keys=[(QID, "joe@example.com")])[0].delivered
    assert store.deliver_many([item], log=log, keys=[(OTHER, "joe@example.com")])[0].delivered
    names = sorted(os.listdir(os.path.join(loc, "new")))
    assert [n.split(",")[0] for n in names] == ["100.M1P1Q1.h", "100.M1P1Q2.h"]
    assert log.find(OTHER, loc) == names[1] and log.find(QID, loc) == names[0]
    assert store.holds(loc, names[1]) and not store.holds(loc, "100.M1P1Q3.h,S=1,W=1")
    assert not store.holds(loc, "../new/" + names[1])
