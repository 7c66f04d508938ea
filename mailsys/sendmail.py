"""``mailsys sendmail``: the sendmail command line that cron, mailx, PHP and
scripts expect, injecting into a running server.

Flags follow Postfix's sendmail(1): ``-f``/``-r`` sender, ``-F`` full name,
``-t`` recipients from To/Cc/Bcc, or from Resent-To/Resent-Cc/Resent-Bcc when
the message has any (added to any on the command line; Bcc and Resent-Bcc
lines are then removed), ``-i``/``-oi`` (a line of one dot does not end the
message), ``-N``/``-R``/``-V`` DSN requests (NOTIFY, RET, ENVID), and the no-op flags old programs
pass (``-oXXX``, ``-odb``, ``-v``, ``-m``, ``-bm``, ``-U``).  ``-bp`` lists the
queue and ``-bi`` (newaliases) does nothing: aliases reload by themselves.
``-q`` flushes the queue (``-qRSITE``: the mail for SITE), ``-qINTERVAL`` does
nothing.  Each recipient argument is an address list (``'Joe <joe@x>, ann'``).

The message is read from stdin (at most ``limits.message_size`` bytes), line
ends made CRLF, the header completed with From, Date and Message-ID when
missing (RFC 6409 section 8), and handed over on the submit socket
(mailsys.control): the command exits 0 only once the server has the message
on disk, fsynced; when the server is down it leaves the message in the maildrop
for the server to pick up when it starts (mailsys.maildrop), as Postfix's
postdrop does.  Unqualified addresses get the first local domain (else the
host name), as Postfix appends ``myorigin``: the envelope's, and those in the
header's address fields (mailsys.addresslist).  Leading mbox ``From `` lines
are dropped, as Postfix's sendmail does.
"""
import email.utils
import os
import pwd
import re
import sys
import time
import uuid

from mailsys import addresslist
from mailsys.cli import EXIT_USAGE, CommandError, load_config

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_FROM_LINES = re.compile(rb"(?:>*From [^\n]*(?:\n|\Z))*")
_VALUE_FLAGS = set("fFrNRVBCLhpX")
_IGNORED_FLAGS = set("vmnUdeA")


class Usage(CommandError):
    def __init__(self, message):
        super().__init__(message, EXIT_USAGE)


def parse_argv(argv):
    """Sendmail's own flag syntax (``-fSENDER``, ``-f SENDER``, ``-oi``)."""
    opts = {"sender": None, "fullname": None, "extract": False, "dots": True, "config": None,
            "mode": "m", "notify": None, "ret": None, "envid": None, "flush": None,
            "interval": None, "gateway": False}
    rcpts = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            rcpts.extend(argv[i:])
            break
        if a == "--config" or a.startswith("--config="):
            if "=" in a:
                opts["config"] = a.partition("=")[2]
            elif i < len(argv):
                opts["config"], i = argv[i], i + 1
            else:
                raise Usage("--config needs a path")
            continue
        if not a.startswith("-") or a == "-":
            rcpts.append(a)
            continue
        flag, value = a[1], a[2:]
        if flag in _VALUE_FLAGS and not value:
            if i >= len(argv):
                raise Usage(f"option -{flag} needs a value")
            value, i = argv[i], i + 1
        if flag in "fr":
            opts["sender"] = value
        elif flag == "F":
            opts["fullname"] = value
        elif flag == "t":
            opts["extract"] = True
        elif flag == "i":
            opts["dots"] = False
        elif flag == "o":
            if value == "i":
                opts["dots"] = False
            # every other -oX is an old sendmail.cf option: accepted, ignored
        elif flag == "b":
            if value not in ("m", "p", "i", "d"):
                raise Usage(f"-b{value} is not supported (use -bm, -bp or -bi)")
            opts["mode"] = value
        elif flag == "N":
            opts["notify"] = value
        elif flag == "R":
            opts["ret"] = value
        elif flag == "V":
            opts["envid"] = value
        elif flag == "q":
            queue_flag(opts, value)
        elif flag == "G":
            opts["gateway"] = True      # relayed mail: its header is not ours to complete
        elif flag in _IGNORED_FLAGS or flag in _VALUE_FLAGS:
            pass
        else:
            raise Usage(f"unknown option -{flag}")
    out = []
    for r in rcpts:
        out.extend(argument_addresses(r))
    return opts, out


def queue_flag(opts, value):
    """``-q`` as Postfix's sendmail reads it: alone it flushes the queue (so it
    never takes the next argument as its value, which made scripts' bare
    ``sendmail -q`` a usage error); ``-qRSITE`` flushes the mail for SITE;
    ``-qINTERVAL`` (sendmail's queue-run period, ``-q15m``) is ignored, the
    command then doing nothing, as in Postfix."""
    if not value:
        opts["mode"], opts["flush"] = "q", ""
    elif value[0].isdigit():
        opts["interval"] = value
    elif value[0] == "R":
        if not value[1:]:
            raise Usage("-qR needs a site, as in -qRexample.com")
        opts["mode"], opts["flush"] = "q", value[1:]
    else:
        raise Usage(f"-q{value[0]} is not supported (use -q, -qRSITE or -qINTERVAL)")


def argument_addresses(argument):
    """The addresses of one recipient argument, parsed as an RFC 5322 address
    list as Postfix's sendmail does (``'a@x, b@y'``, ``'Carol <carol@x>'``).
    An argument that is no readable list is passed on as it is, for the
    server to refuse with its reason."""
    try:
        return [a.spec for a in addresslist.parse(argument) if a.spec]
    except addresslist.Unparsed:
        return [argument.strip()] if argument.strip() else []


def read_message(stream, limit, dots):
    """stdin up to ``limit`` bytes, CRLF line ends; without -i a line holding
    only "." ends it, as in sendmail."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise CommandError(f"message too big: more than limits.message_size ({limit} bytes)")
    data = skip_from_lines(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    if dots:
        if data.startswith(b".\n") or data == b".":
            data = b""
        else:
            end = data.find(b"\n.\n")
            if end >= 0:
                data = data[:end + 1]
            elif data.endswith(b"\n."):
                data = data[:-1]
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data.replace(b"\n", b"\r\n")


def split_header(message):
    """(header lines, body) of a CRLF message.  The header ends at the first
    empty line or at the first line that is no field (then the body starts
    there and a blank line is put in between)."""
    lines = message.split(b"\r\n")
    header = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == b"":
            i += 1
            break
        if _FIELD.match(line) or (header and line[:1] in (b" ", b"\t")):
            header.append(line)
            i += 1
            continue
        break
    body = b"\r\n".join(lines[i:])
    return header, body


def fields(header):
    """[(lowercase name, unfolded value)] of header lines."""
    out = []
    for line in header:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b" " + line.strip())
            continue
        name, _, value = line.partition(b":")
        out.append((name.strip().lower(), value.strip()))
    return out


def drop_field(header, name):
    out, dropping = [], False
    for line in header:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            out.append(line)
    return out


def skip_from_lines(data):
    """``data`` (LF line ends) without its leading mbox ``From `` lines
    (``>From `` ones included): Postfix's sendmail drops them, so a message
    saved from an mbox keeps its header instead of becoming all body."""
    return data[_FROM_LINES.match(data).end():]


# The header fields whose bare local parts get @DOMAIN, as Postfix's cleanup
# does for locally submitted mail (append_at_myorigin): the RFC 5322 address
# fields, and the older ones that still carry addresses a reply or a report
# goes to (Errors-To, Return-Receipt-To, Apparently-To, and RFC 8098's
# Disposition-Notification-To): a bare "root" there sends the notice nowhere.
ADDRESS_FIELDS = frozenset([b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc",
                            b"resent-from", b"resent-sender", b"resent-reply-to",
                            b"resent-to", b"resent-cc", b"resent-bcc",
                            b"errors-to", b"return-receipt-to", b"apparently-to",
                            b"disposition-notification-to"])


def qualify_header(header, domain):
    """Header lines with ``@domain`` after each bare local part in the
    address fields (``From: root (Cron Daemon)`` becomes ``From:
    root@example.com (Cron Daemon)``): receiving providers refuse a From
    without a domain.  Display names, comments and folding stay as written;
    a field that cannot be parsed, and addresses in a group, are kept."""
    at = domain.encode("utf-8").decode("latin-1")
    out = []
    for line in header:
        if line[:1] in (b" ", b"\t") and out:
            out[-1].append(line)
        else:
            out.append([line])
    lines = []
    for field in out:
        name, colon, _ = field[0].partition(b":")
        if colon and name.strip().lower() in ADDRESS_FIELDS:
            text = b"\r\n".join(field).decode("latin-1")
            name, _, body = text.partition(":")
            field = f"{name}:{addresslist.qualify(body, at)}".encode("latin-1").split(b"\r\n")
        lines.extend(field)
    return lines


def qualify(address, domain):
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address and "@" not in address:
        address = f"{address}@{domain}"
    return address


def sender_address(value):
    """``-f``'s value as Postfix's sendmail reads it: the address of its first
    mailbox (``-f 'Cron <root@x>'`` is ``root@x``; ``-f '<>'`` and ``-f ''`` the
    null sender).  A value that is no readable address is passed on as it is,
    for the server to refuse with its reason."""
    try:
        found = addresslist.parse(value)
    except addresslist.Unparsed:
        return value
    return found[0].spec if found else value


def default_domain(config):
    return config.domains.local[0] if config.domains.local else config.server.hostname


def compose(opts, rcpts, message, config, login):
    """The envelope (sender, recipients) and the completed message."""
    domain = default_domain(config)
    header, body = split_header(message)
    have = fields(header)
    names = {n for n, _ in have}
    if opts["extract"]:
        rcpts = rcpts + extract_recipients(have)
        header = drop_field(drop_field(header, b"bcc"), b"resent-bcc")
    if not opts.get("gateway"):
        header = qualify_header(header, domain)
    rcpts = [qualify(r, domain) for r in rcpts]
    if not rcpts:
        raise Usage("no recipients: name them as arguments or use -t")
    sender = (qualify(sender_address(opts["sender"]), domain) if opts["sender"] is not None
              else f"{login}@{domain}")
    extra = []
    if b"from" not in names:
        name = opts["fullname"]
        shown = sender or f"MAILER-DAEMON@{domain}"
        extra.append(f"From: {email.utils.formataddr((name, shown)) if name else shown}")
    if b"date" not in names:
        extra.append(f"Date: {email.utils.formatdate(time.time(), localtime=True)}")
    if b"message-id" not in names:
        extra.append(f"Message-ID: <{time.strftime('%Y%m%d%H%M%S')}.{uuid.uuid4().hex[:16]}"
                     f"@{config.server.hostname}>")
    head = b"".join(line + b"\r\n" for line in header)
    head += "".join(x + "\r\n" for x in extra).encode("utf-8")
    return sender, rcpts, head + b"\r\n" + body


def extract_recipients(have):
    """-t: the addresses of To, Cc and Bcc, or, when the message has any
    Resent-To, Resent-Cc or Resent-Bcc field, of those alone: resent fields
    describe the latest sending (RFC 5322 section 3.6.6), as Postfix's
    sendmail -t takes them."""
    resent = [(n, v) for n, v in have if n in (b"resent-to", b"resent-cc", b"resent-bcc")]
    out = []
    for name, value in resent or [(n, v) for n, v in have if n in (b"to", b"cc", b"bcc")]:
        text = value.decode("utf-8", "replace")
        try:
            out.extend(a.spec for a in addresslist.parse(text) if a.spec)
        except addresslist.Unparsed:
            raise CommandError(f"the {name.decode('latin-1').title()} field is no readable "
                               f"address list ({text[:100]!r}); fix it or name the recipients "
                               f"as arguments; the message was not sent")
    return out


def run(argv, stdin=None, out=None):
    from mailsys import control

    opts, rcpts = parse_argv(argv)
    args = type("Args", (), {"config": opts["config"]})()
    if opts["mode"] in ("i", "d") or opts["interval"]:
        return 0        # aliases reload by themselves; the daemon is twistd -n mailsys
    if opts["mode"] == "q":
        return flush(opts, rcpts, args)
    if opts["mode"] == "p":
        from mailsys.queue_cli import cli_list

        args.json = False
        return cli_list(args, out or sys.stdout)
    config = load_config(args)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    message = read_message(stdin, config.limits.message_size, opts["dots"])
    login = pwd.getpwuid(os.getuid()).pw_name
    sender, rcpts, message = compose(opts, rcpts, message, config, login)
    request = {"cmd": "submit", "sender": sender, "recipients": rcpts, "size": len(message),
               **dsn_request(opts)}
    path = control.submit_path(config)
    try:
        answer = control.request(path, request, message,
                                 config_file=control.config_file_of(config))
    except control.NotRunning as e:
        if not e.absent:
            raise CommandError(f"{e}; the message was not sent")
        from mailsys import maildrop

        try:
            maildrop.drop(config, request, message)   # picked up when the server starts
        except OSError as err:
            raise CommandError(f"{e}, and the maildrop {maildrop.maildrop_path(config)} is not "
                               f"usable ({err.strerror}); the message was not sent")
        return 0
    if not answer.get("ok"):
        raise CommandError(f"{answer.get('error')}; the message was not sent")
    return 0


DSN_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def dsn_request(opts):
    """-N, -R, -V as the submit request's DSN fields (RFC 3461 values)."""
    out = {}
    if opts["notify"]:
        notify = [x.strip().upper() for x in opts["notify"].split(",") if x.strip()]
        if not notify or not set(notify) <= DSN_NOTIFY or ("NEVER" in notify and len(notify) > 1):
            raise Usage("-N takes never, or a list of success, failure and delay")
        out["notify"] = notify
    if opts["ret"]:
        ret = opts["ret"].strip().upper()
        if ret not in ("HDRS", "FULL"):
            raise Usage("-R takes hdrs or full")
        out["ret"] = ret
    if opts["envid"]:
        envid = opts["envid"]
        if not (envid.isascii() and envid.isprintable()) or len(envid) > 100:
            raise Usage("-V takes printable ASCII, at most 100 characters")
        out["envid"] = envid
    return out


def flush(opts, rcpts, args):
    """-q: attempt the queue now through the running server's control socket,
    as ``mailsys queue flush`` does (silent on success, as Postfix's
    ``sendmail -q``, since cron mails any output)."""
    from mailsys.queue_cli import _ask

    if rcpts:
        raise Usage("-q flushes the queue and takes no recipients")
    request = {"cmd": "flush"}
    if opts["flush"]:
        request["domain"] = opts["flush"]
    _ask(load_config(args), request)
    return 0
