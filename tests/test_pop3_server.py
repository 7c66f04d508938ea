"""The POP3 protocol (mailsys.pop3.server) on a StringTransport with a task.Clock:
exact replies, every command split at every byte boundary, STLS, AUTH, the
UPDATE state, timeouts and hostile input.  The backend is a small fake that
opens a real Maildir (or mbox) through mailsys.pop3.service.open_mailbox."""
import base64
import os
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from mailsys.mda.maildir import MaildirStore
from mailsys.mda.mbox import MboxStore
from mailsys.mda.store import mailbox_location
from mailsys.pop3.server import AUTH_FAILED, IDLE_TIMEOUT, MAX_LINE, POP3Server, Refusal
from mailsys.pop3.service import IN_USE, open_mailbox
from mailsys.pop3.wire import encode
from tests.helpers import logged  # noqa: F401  (fixture)

HOST = "pop.example.com"
USER = "joe@example.com"
PASSWORD = "secret pw"
PREFIX = b"Return-Path: <a@b.org>\r\nDelivered-To: joe@example.com\r\n"
BANNER = b"+OK pop.example.com POP3 server ready\r\n"
CAPA_CLEAR = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
              b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION mailsys\r\n.\r\n")
CAPA_TLS = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION mailsys\r\n.\r\n")
CAPA_TRANSACTION = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
                    b"PIPELINING\r\nIMPLEMENTATION mailsys\r\n.\r\n")
NEED_TLS = b"-ERR [AUTH] Authentication requires TLS: send STLS first\r\n"
FAILED = b"-ERR [AUTH] Authentication failed\r\n"


def message(i):
    return (b"Subject: m%d\r\n\r\nbody %d\r\n.leading dot\r\nFrom here\r\n" % (i, i))


def as_stored(i):
    """(prefix, message) as the MDA hands them to a store: LF line ends."""
    return PREFIX.replace(b"\r\n", b"\n"), message(i).replace(b"\r\n", b"\n")


def stored(i):
    return b"".join(as_stored(i))


def plain(user, password, authz=""):
    return base64.b64encode(f"{authz}\0{user}\0{password}".encode()).decode()


class TLSTransport(StringTransportWithDisconnection):
    def __init__(self):
        super().__init__()
        self.tls_starts = []

    def startTLS(self, context, normal=True):
        self.tls_starts.append((context, len(self.value())))


class Backend:
    """Accepts USER/PASSWORD; opens the real mailbox synchronously."""

    CONTEXT = object()

    def __init__(self, root, kind="maildir"):
        self.root, self.kind = root, kind
        self.logins = []
        self.disconnects = 0
        self.hold = False
        self.held = []

    def connected(self, proto):
        return None

    def disconnected(self, proto):
        self.disconnects += 1

    def tls_context(self, proto):
        return self.CONTEXT

    def login(self, proto, user, password, method):
        self.logins.append((user, password, method))
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, user, password))
            return d
        return defer.succeed(self.answer(user, password))

    def answer(self, user, password):
        if (user, password) != (USER, PASSWORD):
            return Refusal(AUTH_FAILED, auth_failure=True)
        from mailsys.pop3.service import Maildrop

        opened = open_mailbox(self.root, USER, self.kind)
        if opened is None:
            return IN_USE
        box, lock, entries = opened
        return Maildrop(USER, box, lock, entries, defer.maybeDeferred)

    def release(self):
        for d, user, password in self.held:
            d.callback(self.answer(user, password))
        self.held = []


class Client:
    def __init__(self, backend, tls=True, tls_available=True, max_auth_failures=3):
        self.clock = Clock()
        self.t = TLSTransport()
        self.backend = backend
        self.proto = POP3Server(backend, HOST, clock=self.clock, tls_available=tls_available,
                                tls=tls, max_auth_failures=max_auth_failures, label="test[127.0.0.1]")
        self.t.protocol = self.proto
        self.proto.makeConnection(self.t)
        self.pos = 0

    def pump(self):
        while self.t.producer is not None:
            self.t.producer.resumeProducing()

    def feed(self, data):
        self.proto.dataReceived(data)
        self.pump()

    def out(self):
        v = self.t.value()
        new, self.pos = v[self.pos:], len(v)
        return new

    def send(self, data):
        self.feed(data)
        return self.out()

    def login(self):
        assert self.send(f"USER {USER}\r\n".encode()) == b"+OK Send your password\r\n"
        reply = self.send(f"PASS {PASSWORD}\r\n".encode())
        assert reply.startswith(b"+OK Logged in: "), reply
        return reply

    @property
    def closed(self):
        return not self.t.connected


@pytest.fixture
def root(tmp_path):
    path = mailbox_location(str(tmp_path), USER, "maildir")
    store = MaildirStore()
    for i in range(3):
        assert store.deliver(path, *as_stored(i), 0).delivered
        time.sleep(0.002)
    return str(tmp_path)


def maildir(root):
    return mailbox_location(root, USER, "maildir")


def _delivery_order(name):
    """``<sec>.M<usec>P...``: by time, numerically.  A plain string sort puts
    M100734 before M93377 (and so failed now and then, when two deliveries of
    one second straddled a power of ten in microseconds)."""
    sec, _, rest = name.partition(".")
    usec = rest[1:].partition("P")[0] if rest.startswith("M") else "0"
    return int(sec), int(usec), name


def names(root):
    return (sorted(os.listdir(os.path.join(maildir(root), "new")), key=_delivery_order),
            sorted(os.listdir(os.path.join(maildir(root), "cur")), key=_delivery_order))


def sizes():
    return [len(stored(i)) + stored(i).count(b"\n") for i in range(3)]


# -- greeting, CAPA, STLS -----------------------------------------------------------------

def test_banner_and_capabilities_before_and_after_stls(root):
    c = Client(Backend(root), tls=False)
    assert c.out() == BANNER
    assert c.send(b"CAPA\r\n") == CAPA_CLEAR
    assert c.send(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert c.t.tls_starts == [(Backend.CONTEXT, len(BANNER + CAPA_CLEAR) + 27)]
    assert c.send(b"CAPA\r\n") == CAPA_TLS
    assert c.send(b"STLS\r\n") == b"-ERR TLS is already active\r\n"
    c.login()
    assert c.send(b"CAPA\r\n") == CAPA_TRANSACTION


def test_no_stls_without_a_certificate(root):
    c = Client(Backend(root), tls=False, tls_available=False)
    c.out()
    assert b"STLS" not in c.send(b"CAPA\r\n")
    assert c.send(b"STLS\r\n") == b"-ERR STLS is not available: no certificate is configured\r\n"


def test_credentials_before_tls_are_refused_and_never_checked(root):
    backend = Backend(root)
    c = Client(backend, tls=False)
    c.out()
    assert c.send(f"USER {USER}\r\n".encode()) == NEED_TLS
    assert c.send(f"PASS {PASSWORD}\r\n".encode()) == NEED_TLS
    assert c.send(f"AUTH PLAIN {plain(USER, PASSWORD)}\r\n".encode()) == NEED_TLS
    assert c.send(b"AUTH\r\n") == NEED_TLS
    assert backend.logins == []
    assert c.send(b"STAT\r\n") == b"-ERR Command not valid in this state\r\n"


def test_commands_after_stls_in_the_same_segment_are_discarded(root):
    backend = Backend(root)
    c = Client(backend, tls=False)
    c.out()
    out = c.send(f"STLS\r\nUSER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert backend.logins == [] and c.proto.user is None
    assert c.send(f"PASS {PASSWORD}\r\n".encode()) == b"-ERR Send USER first\r\n"


# -- login --------------------------------------------------------------------------------------

def test_user_pass_login_reports_the_maildrop(root):
    c = Client(Backend(root))
    c.out()
    total = sum(sizes())
    assert c.login() == f"+OK Logged in: 3 messages ({total} octets)\r\n".encode()
    assert c.send(b"USER x\r\n") == b"-ERR Command not valid in this state\r\n"


def test_pass_keeps_spaces_in_the_password(root):
    backend = Backend(root)
    c = Client(backend)
    c.out()
    c.login()
    assert backend.logins == [(USER, "secret pw", "USER")]


@pytest.mark.parametrize("script", [
    [f"AUTH PLAIN {plain(USER, PASSWORD)}"],
    ["AUTH PLAIN", plain(USER, PASSWORD)],
    [f"auth plain {plain(USER, PASSWORD, authz=USER)}"],
])
def test_auth_plain(root, script):
    backend = Backend(root)
    c = Client(backend)
    c.out()
    replies = [c.send(line.encode() + b"\r\n") for line in script]
    assert replies[:-1] == [b"+ \r\n"] * (len(script) - 1)
    assert replies[-1].startswith(b"+OK Logged in: 3 messages")
    assert backend.logins == [(USER, PASSWORD, "PLAIN")]


def test_auth_list_abort_and_bad_input(root):
    backend = Backend(root)
    c = Client(backend, max_auth_failures=10)
    c.out()
    assert c.send(b"AUTH\r\n") == b"+OK Supported SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert c.send(b"AUTH LOGIN\r\n") == b"-ERR Unsupported authentication mechanism\r\n"
    assert c.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert c.send(b"*\r\n") == b"-ERR Authentication aborted\r\n"
    assert c.send(b"AUTH PLAIN !!!!\r\n") == b"-ERR [AUTH] Cannot decode response\r\n"
    assert c.send(f"AUTH PLAIN {plain(USER, PASSWORD, authz='root@example.com')}\r\n".encode()) == \
        b"-ERR [AUTH] Authentication credentials invalid\r\n"
    assert c.send(b"AUTH PLAIN " + base64.b64encode(b"no nuls") + b"\r\n") == \
        b"-ERR [AUTH] Invalid authentication exchange syntax\r\n"
    assert backend.logins == []


def test_three_failures_close_the_connection(root):
    backend = Backend(root)
    c = Client(backend)
    c.out()
    for _ in range(2):
        c.send(f"USER {USER}\r\n".encode())
        assert c.send(b"PASS wrong\r\n") == FAILED
    assert not c.closed
    c.send(f"USER {USER}\r\n".encode())
    assert c.send(b"PASS wrong\r\n") == \
        b"-ERR [AUTH] Authentication failed; too many failures, closing the connection\r\n"
    assert c.closed and backend.disconnects == 1


def test_second_session_gets_in_use_until_the_first_ends(root):
    first = Client(Backend(root))
    first.out()
    first.login()
    second = Client(Backend(root))
    second.out()
    second.send(f"USER {USER}\r\n".encode())
    assert second.send(f"PASS {PASSWORD}\r\n".encode()) == \
        b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n"
    assert second.proto.state == "AUTHORIZATION" and not second.closed
    first.t.loseConnection()
    second.login()


def test_pipelined_commands_wait_for_the_login(root):
    backend = Backend(root)
    backend.hold = True
    c = Client(backend)
    c.out()
    assert c.send(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\n".encode()) == \
        b"+OK Send your password\r\n"
    backend.release()
    c.pump()
    out = c.out()
    total = sum(sizes())
    assert out == (f"+OK Logged in: 3 messages ({total} octets)\r\n+OK 3 {total}\r\n+OK\r\n").encode()


def test_connection_lost_during_login_releases_the_mailbox(root):
    backend = Backend(root)
    backend.hold = True
    c = Client(backend)
    c.out()
    c.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    c.t.loseConnection()
    backend.release()
    other = Client(Backend(root))
    other.out()
    other.login()


# -- TRANSACTION ------------------------------------------------------------------------------

def logged_in(root, kind="maildir"):
    c = Client(Backend(root, kind))
    c.out()
    c.login()
    return c


def test_stat_list_uidl(root):
    c = logged_in(root)
    s = sizes()
    uids = names(root)[0]
    assert c.send(b"STAT\r\n") == f"+OK 3 {sum(s)}\r\n".encode()
    assert c.send(b"LIST\r\n") == (f"+OK 3 messages ({sum(s)} octets)\r\n1 {s[0]}\r\n2 {s[1]}\r\n"
                                   f"3 {s[2]}\r\n.\r\n").encode()
    assert c.send(b"LIST 2\r\n") == f"+OK 2 {s[1]}\r\n".encode()
    assert c.send(b"UIDL\r\n") == (f"+OK Unique-ID listing follows\r\n1 {uids[0]}\r\n2 {uids[1]}\r\n"
                                   f"3 {uids[2]}\r\n.\r\n").encode()
    assert c.send(b"UIDL 3\r\n") == f"+OK 3 {uids[2]}\r\n".encode()
    for bad in (b"LIST 0", b"LIST 4", b"UIDL 99999"):
        assert c.send(bad + b"\r\n") == b"-ERR No such message\r\n"
    for bad in (b"LIST x", b"LIST -1", b"LIST 1 2", b"UIDL 1e3"):
        assert c.send(bad + b"\r\n") == b"-ERR Syntax: " + bad.split()[0] + b" [msg]\r\n"


def test_retr_sends_crlf_dot_stuffed_bytes_and_the_size_it_announced(root):
    c = logged_in(root)
    for i in range(3):
        out = c.send(b"RETR %d\r\n" % (i + 1))
        head, body = out.split(b"\r\n", 1)
        assert body == encode(stored(i))
        assert body == (PREFIX + message(i)).replace(b"\r\n.leading", b"\r\n..leading") + b".\r\n"
        unstuffed = (PREFIX + message(i))
        assert head == b"+OK %d octets" % len(unstuffed)
        assert c.send(b"LIST %d\r\n" % (i + 1)) == b"+OK %d %d\r\n" % (i + 1, len(unstuffed))


def test_top(root):
    c = logged_in(root)
    headers = PREFIX + b"Subject: m1\r\n\r\n"
    assert c.send(b"TOP 2 0\r\n") == b"+OK Top of message follows\r\n" + headers + b".\r\n"
    assert c.send(b"TOP 2 2\r\n") == (b"+OK Top of message follows\r\n" + headers +
                                      b"body 1\r\n..leading dot\r\n.\r\n")
    assert c.send(b"TOP 2\r\n") == b"-ERR Syntax: TOP msg lines\r\n"
    assert c.send(b"TOP 2 x\r\n") == b"-ERR Syntax: TOP msg lines\r\n"
    assert c.send(b"TOP 9 1\r\n") == b"-ERR No such message\r\n"


def test_dele_rset_and_quit_apply_only_at_update(root):
    c = logged_in(root)
    s = sizes()
    new_before, _ = names(root)
    assert c.send(b"RETR 2\r\n").startswith(b"+OK")
    assert c.send(b"DELE 1\r\n") == b"+OK Message 1 deleted\r\n"
    assert c.send(b"DELE 1\r\n") == b"-ERR Message 1 is deleted\r\n"
    assert c.send(b"RETR 1\r\n") == b"-ERR Message 1 is deleted\r\n"
    assert c.send(b"STAT\r\n") == f"+OK 2 {s[1] + s[2]}\r\n".encode()
    assert c.send(b"LIST\r\n") == f"+OK 2 messages ({s[1] + s[2]} octets)\r\n2 {s[1]}\r\n3 {s[2]}\r\n.\r\n".encode()
    assert c.send(b"RSET\r\n") == f"+OK 3 messages ({sum(s)} octets)\r\n".encode()
    assert c.send(b"DELE 3\r\n") == b"+OK Message 3 deleted\r\n"
    assert names(root) == (new_before, [])       # nothing changed before QUIT
    assert c.send(b"QUIT\r\n") == b"+OK Logging out (1 messages deleted)\r\n"
    assert c.closed
    assert names(root) == ([new_before[0]], [new_before[1] + ":2,S"])


def test_dropped_connection_deletes_nothing(root):
    c = logged_in(root)
    before = names(root)
    c.send(b"RETR 1\r\nDELE 1\r\nDELE 2\r\n")
    c.t.loseConnection()
    assert names(root) == before
    again = logged_in(root)      # the lock was released
    assert again.send(b"STAT\r\n").startswith(b"+OK 3 ")


def test_idle_timeout_logs_out_without_update(root):
    c = logged_in(root)
    before = names(root)
    c.send(b"DELE 1\r\n")
    c.clock.advance(IDLE_TIMEOUT - 1)
    assert c.send(b"NOOP\r\n") == b"+OK\r\n"     # a command moves the deadline
    c.clock.advance(IDLE_TIMEOUT - 1)
    assert not c.closed
    c.clock.advance(1)
    assert c.out() == b"-ERR Autologout: idle for too long\r\n"
    assert c.closed and names(root) == before


def test_idle_timeout_before_login(root):
    c = Client(Backend(root), tls=False)
    c.out()
    c.feed(b"CAPA")                                # a partial line is not a command
    c.clock.advance(IDLE_TIMEOUT)
    assert c.out() == b"-ERR Autologout: idle for too long\r\n" and c.closed
    assert IDLE_TIMEOUT >= 600


def test_quit_in_authorization(root):
    c = Client(Backend(root))
    c.out()
    assert c.send(b"QUIT\r\n") == b"+OK pop.example.com POP3 server signing off\r\n"
    assert c.closed


def test_mbox_session_unquotes_and_deletes_at_quit(tmp_path):
    root = str(tmp_path)
    path = mailbox_location(root, USER, "mbox")
    store = MboxStore()
    for i in range(3):
        assert store.deliver(path, *as_stored(i), 0, sender="a@b.org").delivered
    c = logged_in(root, "mbox")
    s = sizes()
    assert c.send(b"STAT\r\n") == f"+OK 3 {sum(s)}\r\n".encode()
    out = c.send(b"RETR 3\r\n")
    assert out == b"+OK %d octets\r\n" % s[2] + encode(stored(2))
    assert b"\r\nFrom here\r\n" in out
    assert c.send(b"DELE 2\r\nQUIT\r\n") == b"+OK Message 2 deleted\r\n+OK Logging out (1 messages deleted)\r\n"
    assert store.messages(path) == [stored(0), stored(2)]


# -- segmentation ---------------------------------------------------------------------------------

TLS_SCRIPT = (f"CAPA\r\nUSER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nLIST\r\nUIDL\r\nLIST 2\r\n"
              f"UIDL 9\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\nRETR 1\r\nRSET\r\nNOOP\r\nBOGUS\r\n"
              f"list 3\r\nRETR 3\n").encode()
CLEAR_SCRIPT = b"CAPA\r\nUSER x\r\nNOOP\r\nAUTH\r\nQUIT\r\n"


def transcript(root, pieces, tls):
    c = Client(Backend(root), tls=tls)
    for piece in pieces:
        c.feed(piece)
    out = c.t.value()
    if not c.closed:
        c.t.loseConnection()
    return out


@pytest.mark.parametrize("script, tls", [(TLS_SCRIPT, True), (CLEAR_SCRIPT, False)])
def test_every_split_gives_the_same_replies(root, script, tls):
    whole = transcript(root, [script], tls)
    assert whole.count(b"\r\n+OK") + whole.count(b"\r\n-ERR") >= script.count(b"\n") - 1
    for i in range(1, len(script)):
        assert transcript(root, [script[:i], script[i:]], tls) == whole, i
    assert transcript(root, [script[i:i + 1] for i in range(len(script))], tls) == whole


# -- hostile input --------------------------------------------------------------------------------

def test_long_line_is_refused_and_changes_nothing(root):
    c = logged_in(root)
    assert c.send(b"DELE " + b"1" * MAX_LINE + b"\r\n") == b"-ERR Line too long\r\n"
    assert c.send(b"X" * (MAX_LINE * 4)) == b""      # no end yet: held, not buffered
    assert len(c.proto._buf) <= MAX_LINE
    assert c.send(b"\r\nSTAT\r\n") == b"-ERR Line too long\r\n+OK 3 %d\r\n" % sum(sizes())


def test_bad_bytes_and_unknown_commands(root):
    c = Client(Backend(root))
    c.out()
    assert c.send(b"US\x00ER x\r\n") == b"-ERR Invalid characters in command\r\n"
    assert c.send(b"USER \xff\xfe\r\n") == b"-ERR Invalid characters in command\r\n"
    assert c.send(b"APOP joe 0123\r\n") == b"-ERR Command not valid in this state\r\n"
    assert c.send(b"XYZZY\r\n") == b"-ERR Unknown command\r\n"
    assert c.send(b"\r\n") == b"-ERR Unknown command\r\n"


def test_ten_errors_close_the_session(root):
    c = Client(Backend(root))
    c.out()
    out = c.send(b"BAD\r\n" * 12)
    assert out == (b"-ERR Unknown command\r\n" * 9 +
                   b"-ERR Unknown command; too many errors, closing the connection\r\n")
    assert c.closed


def test_pipelined_input_is_bounded_while_blocked(root):
    backend = Backend(root)
    backend.hold = True
    c = Client(backend)
    c.out()
    c.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    c.send(b"NOOP\r\n" * 20000)
    assert c.t.producerState == "paused"
    backend.release()
    c.pump()
    assert c.t.producerState == "producing"
    assert c.out().count(b"+OK\r\n") == 20000


# -- an mbox another program changes during the session -------------------------------------------

def pop3_lines(events):
    """(level, text) of every mailsys.pop3 event; a traceback shows as "failure"."""
    return [("failure" if "log_failure" in e else e["log_level"].name, e["text"])
            for e in events if e.get("log_namespace") == "mailsys.pop3"]


def mbox_root(tmp_path, n=3):
    root = str(tmp_path)
    path = mailbox_location(root, USER, "mbox")
    store = MboxStore()
    for i in range(n):
        assert store.deliver(path, *as_stored(i), 0, sender="a@b.org", when=1_700_000_000).delivered
    return root, path


def rewrite_in_place(path, data):
    """What Dovecot, mutt or s-nail do: other bytes in the same file (inode)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def test_mbox_rewritten_in_place_sends_and_deletes_nothing_else(tmp_path, logged):
    """The audit's case: another program expunged message 2 in place and a
    delivery made the file as long as before, so message 3 sits at message
    2's offsets.  RETR 2 and TOP 2 must not send it, and QUIT with DELE 2 must
    not delete it; each says why in one line, without a traceback."""
    root, path = mbox_root(tmp_path)
    c = logged_in(root, "mbox")
    data = open(path, "rb").read()
    r0, r1, r2 = data.split(b"\n\nFrom ")
    r1, r2 = b"From " + r1 + b"\n\n", b"From " + r2
    r0 += b"\n\n"
    r3 = r2.replace(b"m2", b"m3").replace(b"body 2", b"body 3")
    rewrite_in_place(path, r0 + r2 + r3)
    assert c.send(b"RETR 2\r\n") == b"-ERR [SYS/TEMP] Message 2 cannot be read now\r\n"
    assert c.send(b"TOP 3 0\r\n") == b"-ERR [SYS/TEMP] Message 3 cannot be read now\r\n"
    assert c.send(b"RETR 1\r\n") == b"+OK %d octets\r\n" % sizes()[0] + encode(stored(0))
    assert c.send(b"DELE 2\r\nQUIT\r\n") == (
        b"+OK Message 2 deleted\r\n"
        b"-ERR [SYS/TEMP] Deleted messages were not removed: the mailbox could not be updated\r\n")
    assert c.closed
    assert open(path, "rb").read() == r0 + r2 + r3
    assert pop3_lines(logged) == [
        ("info", "test[127.0.0.1]: pop3 cannot open message 2 of joe@example.com: "
                 "mbox was changed by another program since the login"),
        ("info", "test[127.0.0.1]: pop3 cannot open message 3 of joe@example.com: "
                 "mbox was changed by another program since the login"),
        ("warn", "pop3: warning: test[127.0.0.1]: user=<joe@example.com>: deleted messages were "
                 "not removed: mbox was changed by another program since the login "
                 "(message 2 is not what was listed)"),
    ]


def test_mbox_change_during_a_transfer_closes_without_the_final_dot(tmp_path):
    """A message of several chunks, rewritten after the first chunk went out
    (after the check at open): the reply is cut off before its last chunk
    and its terminating dot, so the client never takes a mixture of two
    messages for one."""
    root = str(tmp_path)
    path = mailbox_location(root, USER, "mbox")
    big = b"Subject: big\n\n" + b"0123456789 the quick brown fox\n" * 5000
    assert MboxStore().deliver(path, b"", big, 0, sender="a@b.org").delivered
    c = logged_in(root, "mbox")
    c.proto.dataReceived(b"RETR 1\r\n")
    c.t.producer.resumeProducing()                 # the first chunk is out
    first = c.out()
    assert first.startswith(b"+OK %d octets\r\nSubject: big\r\n" % (len(big) + big.count(b"\n")))
    rewrite_in_place(path, open(path, "rb").read().replace(b"brown fox", b"BROWN FOX"))
    c.pump()
    sent = first + c.out()
    assert c.closed
    assert not sent.endswith(b"\r\n.\r\n")
    assert sent.count(b"\r\n") < 1 + big.count(b"\n")       # the last chunk never went out


# -- the real session (mailsys.pop3.service): logins, log lines ----------------------------------

class Pool:
    """The reactor's thread pool as the session uses it: calls wait until run()."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self):
        while self.calls:
            f, args, d = self.calls.pop(0)
            defer.maybeDeferred(f, *args).chainDeferred(d)


def session(root, stores, run):
    from twisted.internet.address import IPv4Address

    from mailsys.pop3.service import POP3Factory
    from tests.helpers import pop3_host

    factory = POP3Factory(pop3_host(root, Clock(), stores, PASSWORD), "pop3s", run=run)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    t = TLSTransport()
    t.protocol = proto
    proto.makeConnection(t)
    t.clear()
    return proto, t


def test_disconnect_line_counts_the_deletions_of_a_commit_that_ends_after_the_close(root, logged):
    """Pipelined DELE ... QUIT and the client closes at once: the commit still
    runs in the thread pool when the connection is gone.  The one disconnect
    line comes after it, with what it deleted."""
    pool = Pool()
    proto, t = session(root, {USER: None}, pool)
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    pool.run()
    proto.dataReceived(b"DELE 1\r\nDELE 2\r\nDELE 3\r\nQUIT\r\n")
    t.loseConnection()                         # before the commit has run
    assert [text for _, text in pop3_lines(logged) if "disconnect" in text] == []
    pool.run()
    assert names(root) == ([], [])
    assert pop3_lines(logged) == [
        ("info", "pop3: connect from unknown[192.0.2.7]"),
        ("info", "pop3: unknown[192.0.2.7]: login user=<joe@example.com>, method=USER, messages=3"),
        ("info", "pop3: disconnect from unknown[192.0.2.7] user=<joe@example.com> "
                 "retr=0/0, top=0, dele=3, deleted=3"),
    ]
    assert proto.factory.host.limiter.total == 0      # the connection's slot is free again


def test_login_while_another_program_holds_the_mbox_lock_is_in_use(tmp_path, logged, monkeypatch):
    """``echo 99999 > mbox.lock`` held past the lock timeout: [IN-USE] (RFC 2449
    8.1.1, in use "for some other reason"), one warning line naming the lock,
    no traceback; the lock is left alone and the session can try again."""
    from mailsys.pop3 import mailbox, service

    now = [1000.0]

    def sleep(s):
        now[0] += s

    monkeypatch.setattr(service, "MboxBox",
                        lambda path: mailbox.MboxBox(path, clock=lambda: now[0], sleep=sleep))
    root, path = mbox_root(tmp_path, 1)
    with open(path + ".lock", "w") as f:
        f.write("99999\n")
    proto, t = session(root, {USER: "mbox"}, defer.maybeDeferred)
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    assert t.value() == (b"+OK Send your password\r\n"
                         b"-ERR [IN-USE] Mailbox is locked by another program, try again later\r\n")
    assert pop3_lines(logged)[-1] == (
        "warn", f"pop3: warning: unknown[192.0.2.7]: user=<joe@example.com>: cannot open the "
                f"mailbox: mbox is locked by another program: {path}.lock was held for more "
                f"than 10 s")
    assert [level for level, _ in pop3_lines(logged)].count("failure") == 0
    assert open(path + ".lock").read() == "99999\n"
    os.unlink(path + ".lock")
    t.clear()
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    assert t.value() == b"+OK Send your password\r\n+OK Logged in: 1 messages (%d octets)\r\n" % sizes()[0]


def test_an_unexpected_error_at_login_still_logs_its_traceback(tmp_path, logged, monkeypatch):
    from mailsys.pop3 import mailbox

    def broken(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mailbox.MboxBox, "load", broken)
    root, _ = mbox_root(tmp_path, 1)
    proto, t = session(root, {USER: "mbox"}, defer.maybeDeferred)
    proto.dataReceived(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    assert t.value().endswith(b"-ERR [SYS/TEMP] Cannot open the mailbox now, try again later\r\n")
    assert pop3_lines(logged)[-1] == (
        "failure", "pop3: unknown[192.0.2.7]: cannot open the mailbox of joe@example.com")
