"""The local control sockets: ``mailsys queue`` and ``mailsys sendmail`` talk to
a running server here.

Two unix sockets, served by worker 0 (the process that owns the queue):

- ``STATE_DIR/control.sock``, mode 0600 in the 0700... 0711 state directory:
  only the service user (and root) may connect, so every queue command is
  allowed on it.  The file mode *is* the access control, as with Postfix's
  ``public/`` and ``private/`` sockets.
- ``STATE_DIR/public/submit.sock``, mode 0666: any local user may inject mail
  (cron, PHP as www-data, scripts), and nothing else.  The caller's uid comes
  from the kernel (SO_PEERCRED) and goes into the Received header.

One request per connection: a JSON object on one line; for ``submit`` it is
followed by exactly ``size`` bytes of message.  One JSON line answers
(``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``) and the server
closes.  A submitted message is answered only once it is in the spool and
fsynced, exactly like ``250`` on the SMTP port.
"""
import json
import os
import shlex
import socket
import struct
import time

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailsys.logs import MailLog
from mailsys.smtp.address import AddressError, parse_path

log = MailLog("mailsys.control")
_tlog = Logger(namespace="mailsys.control")

MAX_REQUEST = 64 * 1024       # bytes of the JSON request line (a thousand recipients fit)
MAX_RECIPIENTS = 1000
REQUEST_TIMEOUT = 60          # seconds for a whole request to arrive
QUEUE_COMMANDS = ("list", "show", "flush", "delete", "hold", "release")
_QID_CHARS = frozenset("0123456789ABCDEF")


def control_path(config):
    return os.path.join(config.server.state_dir, "control.sock")


def submit_path(config):
    return os.path.join(config.server.state_dir, "public", "submit.sock")


class RequestError(Exception):
    pass


def _peer_uid(transport):
    try:
        sock = transport.getHandle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    except (AttributeError, OSError, struct.error):
        return None


def queue_id(value, cmd="hold"):
    """The queue id ``value`` names, upper-cased, or ``ALL`` where ``cmd`` takes
    it (not ``show``); RequestError says what is accepted.

    Ids are upper-case hexadecimal; one typed in lower case is taken as the same
    id, since hex digits leave no doubt (Postfix's postsuper is case-sensitive,
    which only makes an administrator retype it).  ``ALL`` is not, as for
    postsuper: it names every message, and ``delete all`` is not a typo to
    guess at.  ``mailsys queue`` checks with this before it asks the server
    (bad usage, exit 2), and the server again for any other client."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{cmd} needs a queue id, as 'mailsys queue list' shows them")
    if value == "ALL" and cmd != "show":
        return value
    if value.upper() == "ALL":
        raise RequestError(f"show takes one queue id, not {value}: 'mailsys queue list' "
                           f"shows every message" if cmd == "show" else
                           f"write ALL in capitals to {cmd} every message")
    qid = value.upper()
    if len(qid) > 40 or not set(qid) <= _QID_CHARS:
        raise RequestError(f"{value[:40]!r} is not a queue id: use one that "
                           f"'mailsys queue list' shows")
    return qid


def flush_domain(value):
    """``D`` or ``@D`` for ``queue flush --domain``, as ETRN takes them: the
    mail for D and every domain below it (docs/operations.rst); RequestError
    says what is accepted."""
    from mailsys.smtp.address import parse_domain

    if not isinstance(value, str):
        raise RequestError("flush --domain needs a domain name, such as example.com")
    domain = parse_domain(value[1:] if value.startswith("@") else value)
    if domain is None or domain.startswith("["):
        raise RequestError(f"{value[:100]!r} is not a domain name: give one such as "
                           f"example.com or @example.com (both flush it and its subdomains)")
    return domain


def check_submit(request, limit):
    """Validate a submission request in place (normalised addresses, ``smtputf8``);
    RequestError says what is wrong.  The maildrop (mailsys.maildrop) uses it too."""
    size = request.get("size")
    if not isinstance(size, int) or size < 0:
        raise RequestError("the message size is missing")
    if size > limit:
        raise RequestError(f"message too big: {size} bytes; limits.message_size is {limit}")
    try:
        sender = request.get("sender") or ""
        if not isinstance(sender, str):
            raise TypeError("sender")
        utf8 = not sender.isascii()
        found = parse_path(f"<{sender}>", "sender", smtputf8=True, allow_null=True)
        request["sender"] = str(found) if found is not None else ""
        rcpts = request.get("recipients")
        if not isinstance(rcpts, list) or not rcpts:
            raise RequestError("no recipients")
        if len(rcpts) > MAX_RECIPIENTS:
            raise RequestError(f"too many recipients (at most {MAX_RECIPIENTS})")
        out = []
        for r in rcpts:
            if not isinstance(r, str):
                raise TypeError("recipient")
            utf8 = utf8 or not r.isascii()
            try:
                out.append(str(parse_path(f"<{r}>", "recipient", smtputf8=True)))
            except AddressError as e:
                raise RequestError(f"bad recipient address {r[:100]!r}: {e.reply.text}")
        request["recipients"] = out
        request["smtputf8"] = utf8
        notify = request.get("notify")
        if notify is not None and (not isinstance(notify, list) or not notify or not set(notify)
                                   <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
                                   or ("NEVER" in notify and len(notify) > 1)):
            raise RequestError("bad DSN notify list")
        if request.get("ret") not in (None, "HDRS", "FULL"):
            raise RequestError("bad DSN ret")
        envid = request.get("envid")
        if envid is not None and not (isinstance(envid, str) and envid.isascii()
                                      and envid.isprintable() and len(envid) <= 100):
            raise RequestError("bad DSN envid")
    except AddressError as e:
        raise RequestError(f"bad sender address {sender[:100]!r}: {e.reply.text}")
    except TypeError:
        raise RequestError("addresses must be strings")


def normalise_newlines(data):
    """CRLF, bare LF and bare CR all become CRLF: what the spool holds, and
    what no outgoing line may break (never a bare CR or LF on the wire)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class ControlProtocol(Protocol):
    """One request, one answer.  Errors are answered, never raised."""

    def __init__(self, service, allowed):
        self.service = service
        self.allowed = allowed
        self._buf = b""
        self._request = None
        self._body = None
        self._need = 0
        self._done = False
        self._timer = None

    def connectionMade(self):
        self.uid = _peer_uid(self.transport)
        self._timer = self.service.reactor.callLater(REQUEST_TIMEOUT, self._timeout)

    def connectionLost(self, reason=None):
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _timeout(self):
        self._timer = None
        self._answer({"ok": False, "error": "request timed out"})

    def dataReceived(self, data):
        if self._done:
            return
        if self._request is None:
            self._buf += data
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REQUEST:
                    self._answer({"ok": False, "error": "request too long"})
                return
            line, data = self._buf[:end], self._buf[end + 1:]
            self._buf = b""
            try:
                self._request = self._parse(line)
            except RequestError as e:
                self._answer({"ok": False, "error": str(e)})
                return
            if self._request["cmd"] != "submit":
                self._dispatch()
                return
            self._body, self._need = [], self._request["size"]
        if data:
            take = data[:self._need]
            self._body.append(take)
            self._need -= len(take)
            if len(data) > len(take):
                self._answer({"ok": False, "error": "more message data than announced"})
                return
        if self._need == 0 and self._body is not None:
            body, self._body = b"".join(self._body), None
            self._dispatch(body)

    def _parse(self, line):
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):     # RecursionError: [[[[... nested too deep
            raise RequestError("the request is not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise RequestError("the request names no command")
        cmd = request["cmd"]
        if cmd not in self.allowed:
            raise RequestError(f"{cmd[:20]!r} is not allowed on this socket")
        if cmd in ("show", "delete", "hold", "release"):
            request["id"] = queue_id(request.get("id"), cmd)
        if cmd == "flush" and request.get("domain") is not None:
            request["domain"] = flush_domain(request["domain"])
        if cmd == "submit":
            check_submit(request, self.service.config.limits.message_size)
        return request

    def _dispatch(self, body=None):
        request = self._request
        try:
            d = defer.maybeDeferred(getattr(self, "do_" + request["cmd"]), request, body)
        except Exception as e:    # pragma: no cover - getattr of an allowed command
            d = defer.fail(e)

        def failed(f):
            if f.check(RequestError):
                return {"ok": False, "error": str(f.value)}
            _tlog.failure("control: {cmd} failed", f, cmd=request["cmd"])
            return {"ok": False, "error": f"{request['cmd']} failed: {f.getErrorMessage()}"}

        d.addErrback(failed)
        d.addCallback(self._answer)

    def _answer(self, reply):
        if self._done:
            return
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.transport.write(json.dumps(reply).encode("utf-8") + b"\n")
        self.transport.loseConnection()

    # -- commands ----------------------------------------------------------------

    @property
    def queue(self):
        return self.service.queue

    def do_list(self, request, body):
        return {"ok": True, "messages": self.queue.list()}

    def do_show(self, request, body):
        found = self.queue.find(request["id"])      # one id: _parse refused ALL
        if len(found) != 1:
            raise RequestError(f"no message {request['id']} in the queue")
        [msg] = found
        item = self.queue.describe(msg)
        item["params"] = msg.envelope.get("params", {})
        item["client"] = msg.envelope.get("client", {})
        message = msg.entry.read_message()
        end = message.find(b"\r\n\r\n")
        head = message[:end + 2] if end >= 0 else message
        item["headers"] = head[:MAX_REQUEST].decode("utf-8", "replace")
        return {"ok": True, "message": item}

    def do_flush(self, request, body):
        return {"ok": True, "count": self.queue.flush(request.get("domain"))}

    def _each(self, verb):
        def run(request, body):
            qid = request["id"]
            d = getattr(self.queue, verb)(qid)

            def done(ids):
                if ids or qid == "ALL":
                    return {"ok": True, "ids": ids}
                if not self.queue.find(qid):
                    raise RequestError(f"no message {qid} in the queue")
                # Held already (hold), or not held (release): as asked, so a
                # success that says so; postsuper -h/-H pass over it quietly.
                return {"ok": True, "ids": [], "unchanged": [qid]}

            return d.addCallback(done)
        return run

    def do_delete(self, request, body):
        return self._each("delete")(request, body)

    def do_hold(self, request, body):
        return self._each("hold")(request, body)

    def do_release(self, request, body):
        return self._each("release")(request, body)

    def do_submit(self, request, body):
        dsn = {k: request[k] for k in ("notify", "ret", "envid") if request.get(k) is not None}
        return self.service.submit_local(request["sender"], request["recipients"],
                                         normalise_newlines(body), uid=self.uid,
                                         smtputf8=request["smtputf8"], dsn=dsn)


class ControlFactory(Factory):
    noisy = False

    def __init__(self, service, allowed):
        self.service = service
        self.allowed = frozenset(allowed)

    def buildProtocol(self, addr):
        proto = ControlProtocol(self.service, self.allowed)
        proto.factory = self
        return proto


def listen(service, reactor):
    """Listen on both sockets (worker 0, before the workers start).  Returns the
    Deferreds of the listening ports."""
    config = service.config
    state = config.server.state_dir
    public = os.path.join(state, "public")
    os.makedirs(public, mode=0o711, exist_ok=True)
    # Others may pass through (x) but not list: the way to public/submit.sock.
    os.chmod(state, 0o711)
    os.chmod(public, 0o711)
    out = []
    for path, mode, allowed in ((control_path(config), 0o600, QUEUE_COMMANDS + ("submit",)),
                                (submit_path(config), 0o666, ("submit",))):
        if os.path.exists(path):
            os.unlink(path)      # we hold the state lock: nobody else serves it
        endpoint = endpoints.UNIXServerEndpoint(reactor, path, mode=mode, wantPID=False)
        out.append(endpoint.listen(ControlFactory(service, allowed)))
    return out


# -- client side ----------------------------------------------------------------------

class NotRunning(Exception):
    """No answer; ``absent`` when nothing listens at all (the server is down)."""

    def __init__(self, message, absent=False):
        super().__init__(message)
        self.absent = absent


def config_file_of(config):
    """The file ``config`` was read from, None for the embedded default: what the
    "not running" hint names (:func:`start_command`)."""
    from mailsys.config import EMBEDDED_SOURCE

    return None if config.source == EMBEDDED_SOURCE else config.source


def start_command(config_file=None):
    """How to start the server that reads ``config_file`` (None: the embedded
    default), for the "not running" hint: the bare command would start a
    server on another configuration, with another control socket."""
    if config_file is None:
        return "twistd -n mailsys"
    return f"twistd -n mailsys --config {shlex.quote(config_file)}"


def request(path, req, body=b"", timeout=120, config_file=None):
    """Send one request; return the decoded answer (a dict).  ``config_file``:
    the configuration the caller was given, named in the hint when nothing
    answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(f"mailsys is not running (nothing answers on {path}: "
                             f"{e.strerror}); start it with: {start_command(config_file)}",
                             absent=True)
        except PermissionError:
            raise NotRunning(f"permission denied on {path}; run this as the user "
                             f"mailsys runs as (or root)")
        sock.sendall(json.dumps(req).encode("utf-8") + b"\n" + body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except socket.timeout:
        raise NotRunning(f"mailsys did not answer on {path} within {timeout} s")
    finally:
        sock.close()
    data = b"".join(chunks)
    try:
        return json.loads(data)
    except ValueError:
        raise NotRunning(f"mailsys gave no answer on {path}")


def envelope_for_local(sender, recipients, uid, hostname, dsn=None):
    """The spool envelope of a locally injected message (same shape as SMTP's)."""
    dsn = dsn or {}
    params = {k: dsn[k] for k in ("ret", "envid") if k in dsn}
    extra = {"notify": list(dsn["notify"])} if "notify" in dsn else {}
    return {
        "arrival": time.time(),
        "sender": sender,
        "params": params,
        "recipients": [dict(rcpt=r, state="queued", **extra) for r in recipients],
        "client": {"ip": "", "name": "localhost", "helo": hostname, "proto": "local",
                   "role": "sendmail", "auth": None, "uid": uid},
    }
