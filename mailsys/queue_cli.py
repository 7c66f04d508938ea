"""``mailsys queue ...``: look at and steer the queue of a running server.

Every subcommand is one request on the control socket (mailsys.control), so it
sees exactly what the queue manager knows, including each recipient's last
error, and acts through it (journaled, like any delivery result).
"""
import datetime
import json
import sys

from mailsys.cli import EXIT_USAGE, CommandError, load_config


def _ask(config, request):
    from mailsys import control

    try:
        answer = control.request(control.control_path(config), request,
                                 config_file=control.config_file_of(config))
    except control.NotRunning as e:
        raise CommandError(str(e))
    if not answer.get("ok"):
        raise CommandError(answer.get("error") or "the server refused the request")
    return answer


def _checked(check, *args):
    """An argument the server would refuse, refused here as bad usage (exit 2)."""
    from mailsys.control import RequestError

    try:
        return check(*args)
    except RequestError as e:
        raise CommandError(str(e), EXIT_USAGE)


def _when(t):
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def format_message(m, out):
    state = m["state"]
    if state == "deferred" and m.get("next_attempt"):
        state += f", next attempt {_when(m['next_attempt'])}"
    out.write(f"{m['id']}  {m['size']:>9}  {_when(m['arrival'])}  <{m['sender']}>  ({state})\n")
    for r in m["recipients"]:
        error = f"  ({r['error']})" if r["error"] and r["state"] != "sent" else ""
        out.write(f"    {r['state']:<8}  <{r['address']}>{error}\n")


def cli_list(args, out=None):
    out = out or sys.stdout
    config = load_config(args)
    messages = _ask(config, {"cmd": "list"})["messages"]
    if args.json:
        json.dump(messages, out, indent=1)
        out.write("\n")
        return 0
    if not messages:
        out.write("Mail queue is empty\n")
        return 0
    for m in messages:
        format_message(m, out)
    total = sum(m["size"] for m in messages)
    out.write(f"-- {len(messages)} message{'s' if len(messages) != 1 else ''}, {total} bytes\n")
    return 0


def cli_show(args, out=None):
    from mailsys.control import queue_id

    out = out or sys.stdout
    qid = _checked(queue_id, args.id, "show")
    config = load_config(args)
    m = _ask(config, {"cmd": "show", "id": qid})["message"]
    format_message(m, out)
    out.write(f"attempts: {m['attempts']}\n")
    client = m.get("client") or {}
    if client:
        came = client.get("name") or "-"
        if client.get("ip"):
            came += f" [{client['ip']}]"
        out.write(f"received from: {came} via {client.get('role', '-')}"
                  + (f", authenticated as {client['auth']}" if client.get("auth") else "")
                  + (f", uid {client['uid']}" if client.get("uid") is not None else "") + "\n")
    for r in m["recipients"]:
        out.write(f"recipient <{r['address']}>: {r['state']}, dsn {r['dsn'] or '-'}, "
                  f"last attempt {_when(r['last_attempt'])}"
                  + (f": {r['error']}" if r["error"] else "") + "\n")
    out.write("\n" + m["headers"].replace("\r\n", "\n"))
    return 0


def cli_flush(args, out=None):
    from mailsys.control import flush_domain

    out = out or sys.stdout
    request = {"cmd": "flush"}
    domain = None
    if args.domain is not None:
        domain = request["domain"] = _checked(flush_domain, args.domain)
    config = load_config(args)
    n = _ask(config, request)["count"]
    out.write(f"{n} message{'s' if n != 1 else ''} scheduled for delivery now"
              + (f" (domain {domain})" if domain else "") + "\n")
    return 0


def _each(verb, done, unchanged=None):
    """``unchanged``: what to say when the message already is as asked (held
    already, or not held); that is a success, exit 0 (docs/operations.rst)."""
    def run(args, out=None):
        from mailsys.control import queue_id

        out = out or sys.stdout
        qid = _checked(queue_id, args.id, verb)
        config = load_config(args)
        answer = _ask(config, {"cmd": verb, "id": qid})
        ids = answer["ids"]
        for qid in ids:
            out.write(f"{qid}: {done}\n")
        for qid in answer.get("unchanged", ()):
            out.write(f"message {qid} {unchanged}\n")
        if not ids and not answer.get("unchanged"):
            out.write(f"no message {done}\n")
        return 0
    return run


cli_delete = _each("delete", "deleted")
cli_hold = _each("hold", "placed on hold", "is already on hold")
cli_release = _each("release", "released", "is not on hold")


def add_subcommands(sub, common):
    p = sub.add_parser("list", help="one entry per queued message", parents=[common])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cli_list)
    p = sub.add_parser("show", help="one message: envelope, recipients, headers", parents=[common])
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cli_show)
    p = sub.add_parser("flush", help="attempt delivery of queued mail now", parents=[common])
    p.add_argument("--domain", metavar="D", help="only mail with recipients in D or below it "
                                                 "(D or @D, as ETRN)")
    p.set_defaults(func=cli_flush)
    for verb, func, what in (("delete", cli_delete, "remove a message without a report"),
                             ("hold", cli_hold, "stop delivery attempts until released"),
                             ("release", cli_release, "resume delivery of a held message")):
        p = sub.add_parser(verb, help=what + " (ID or ALL)", parents=[common])
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)
