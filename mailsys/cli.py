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
    return parser


def main(argv=None):
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
    sys.exit(main())
