"""``mailsys queue ...``: look at and steer the queue of a running server.

Every subcommand is one request on the control socket (mailsys.control), so it
sees exactly what the queue manager knows, including each recipient's last
error, and acts through it (journaled, like any delivery result).
"""
import datetime
import json
import sys

from mailsys.cli import CommandError, load_config


def _ask(config, request):
    from mailsys import control

    try:
        answer = control.request(control.control_path(config), request)
    except control.NotRunning as e:
        raise CommandError(str(e))
    if not answer.get("ok"):
        raise CommandError(answer.get("error") or "the server refused the request")
    return answer


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


def cli_list(args, out=sys.stdout):
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


def cli_show(args, out=sys.stdout):
    config = load_config(args)
    m = _ask(config, {"cmd": "show", "id": args.id})["message"]
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


def cli_flush(args, out=sys.stdout):
    config = load_config(args)
    request = {"cmd": "flush"}
    if args.domain:
        request["domain"] = args.domain
    n = _ask(config, request)["count"]
    out.write(f"{n} message{'s' if n != 1 else ''} scheduled for delivery now"
              + (f" (domain {args.domain})" if args.domain else "") + "\n")
    return 0


def _each(verb, done):
    def run(args, out=sys.stdout):
        config = load_config(args)
        ids = _ask(config, {"cmd": verb, "id": args.id})["ids"]
        for qid in ids:
            out.write(f"{qid}: {done}\n")
        if not ids:
            out.write(f"no message {done}\n")
        return 0
    return run


cli_delete = _each("delete", "deleted")
cli_hold = _each("hold", "placed on hold")
cli_release = _each("release", "released")


def add_subcommands(sub, common):
    p = sub.add_parser("list", help="one entry per queued message", parents=[common])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cli_list)
    p = sub.add_parser("show", help="one message: envelope, recipients, headers", parents=[common])
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cli_show)
    p = sub.add_parser("flush", help="attempt delivery of queued mail now", parents=[common])
    p.add_argument("--domain", metavar="D", help="only mail with recipients in D (or below it)")
    p.set_defaults(func=cli_flush)
    for verb, func, what in (("delete", cli_delete, "remove a message without a report"),
                             ("hold", cli_hold, "stop delivery attempts until released"),
                             ("release", cli_release, "resume delivery of a held message")):
        p = sub.add_parser(verb, help=what + " (ID or ALL)", parents=[common])
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)
