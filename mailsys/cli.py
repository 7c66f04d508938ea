"""The ``mailsys`` command: administration of a mail host (CONTRACT section 1).

Each subcommand lives in the module that owns its subject (config, accounts, ...);
this module only parses the command line and maps outcomes to exit statuses:
0 success, 1 failed operation, 2 bad usage or configuration.
"""
import argparse
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A failed operation: the message is one sentence that names the fix."""

    def __init__(self, message, status=EXIT_FAILED):
        super().__init__(message)
        self.status = status


def config_path(args):
    """--config, else $MAILSYS_CONFIG, else None (the embedded default)."""
    return getattr(args, "config", None) or os.environ.get("MAILSYS_CONFIG") or None


def load_config(args):
    from mailsys.config import ConfigError, load

    try:
        return load(config_path(args))
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser():
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (default: $MAILSYS_CONFIG, else the embedded default)")
    parser = _Parser(prog="mailsys", parents=[common],
                     description="Administer a mailsys mail host.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from mailsys import config as config_mod
    from mailsys import accounts_cli

    p = sub.add_parser("config", help="configuration tools", parents=[common])
    psub = p.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    c = psub.add_parser("check", help="validate the configuration", parents=[common])
    c.set_defaults(func=config_mod.cli_check)

    from mailsys import tls as tls_mod

    p = sub.add_parser("tls", help="certificates", parents=[common])
    psub = p.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    c = psub.add_parser("self-signed", help="write a self-signed certificate where [tls] points",
                        parents=[common])
    c.add_argument("--hostname", help="name in the certificate (default: server.hostname)")
    c.add_argument("--force", action="store_true", help="replace an existing certificate")
    c.set_defaults(func=tls_mod.cli_self_signed)

    p = sub.add_parser("user", help="account upkeep", parents=[common])
    accounts_cli.add_subcommands(p.add_subparsers(dest="subcommand", required=True,
                                                  parser_class=_Parser), common)

    from mailsys import queue_cli

    p = sub.add_parser("queue", help="queue upkeep on a running server", parents=[common])
    queue_cli.add_subcommands(p.add_subparsers(dest="subcommand", required=True,
                                               parser_class=_Parser), common)
    # Listed for --help only: main() hands sendmail's own flag syntax to mailsys.sendmail.
    sub.add_parser("sendmail", help="sendmail-compatible local injection: "
                                    "mailsys sendmail [-f SENDER] [-t] [-i] [RCPT ...] < message")
    return parser


# Invoked under these names (a /usr/sbin/sendmail symlink, say), act as they would.
_ALIASES = {"sendmail": ["sendmail"], "mailq": ["queue", "list"], "newaliases": ["sendmail", "-bi"]}
SYSTEM_CONFIG = "/etc/mailsys/mailsys.toml"


def _as_invoked(argv):
    """``sendmail ...`` via a symlink: the system configuration when there is
    one and neither --config nor $MAILSYS_CONFIG says otherwise (a program such
    as cron runs it from any directory, where ./var means nothing)."""
    name = os.path.basename(sys.argv[0] or "")
    if argv is not None or name not in _ALIASES:
        return argv
    argv = _ALIASES[name] + sys.argv[1:]
    if (not os.environ.get("MAILSYS_CONFIG") and os.path.exists(SYSTEM_CONFIG)
            and not any(a == "--config" or a.startswith("--config=") for a in argv)):
        argv.insert(0, f"--config={SYSTEM_CONFIG}")
    return argv


def main(argv=None):
    """Run one command; its exit status.

    A reader that stops early (``mailsys queue list | head -2``) closes our
    stdout: the rest of the output has nowhere to go, so the command stops
    quietly with status 1 (the operation, printing, did not complete) instead
    of a BrokenPipeError traceback.  Postfix's tools die of SIGPIPE there
    (status 141 in the shell); a Python program cannot do that without
    leaving the interpreter mid-statement, and the contract's statuses are
    0, 1 and 2 (docs/operations.rst)."""
    try:
        status = _run(argv)
        sys.stdout.flush()    # inside the try: buffered output fails here, not at exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_FAILED
    return status


def _stdout_to_devnull():
    """The interpreter flushes stdout once more at exit: point the descriptor at
    /dev/null so that flush has somewhere to go."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _run(argv):
    argv = _as_invoked(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    lead = []
    while raw[:1] == ["--config"] and len(raw) > 1 or raw[:1] and raw[0].startswith("--config="):
        n = 1 if raw[0].startswith("--config=") else 2
        lead, raw = lead + raw[:n], raw[n:]
    if raw[:1] == ["sendmail"]:
        from mailsys import sendmail

        try:
            return sendmail.run(lead + raw[1:])
        except CommandError as e:
            print(f"mailsys sendmail: {e}", file=sys.stderr)
            return e.status
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CommandError as e:
        print(f"mailsys: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return EXIT_FAILED
    return EXIT_OK if status is None else status


if __name__ == "__main__":  # pragma: no cover
    # python3 -m mailsys.cli: run the module's importable copy, so that the
    # CommandError the subcommands raise is the one main() catches.
    from mailsys.cli import main as _main

    sys.exit(_main())
