"""``mailsys user add|passwd|del|list``: upkeep of the users file (CONTRACT sections 1, 3).

Passwords are never taken from the command line (there is no ``--password``), never
printed and never put into an exception message: they come from a terminal prompt
(twice) or from one line of standard input with ``--password-stdin``.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys

from mailsys import accounts
from mailsys.accounts import AccountsError, User


def add_subcommands(subparsers, common_parent):
    """Register ``add``, ``passwd``, ``del`` and ``list`` on the ``user`` subparsers."""
    p = subparsers.add_parser(
        "add", parents=[common_parent], help="add an account",
        description="Add an account at a local domain.  Prompts twice for the password "
                    "unless --password-stdin is given.")
    p.add_argument("address", metavar="ADDRESS")
    _password_stdin(p)
    p.add_argument("--store", choices=accounts.STORES, default=None,
                   help="mailbox format (default: mailbox.default_store)")
    p.add_argument("--quota", type=_quota, default=None, metavar="BYTES",
                   help="mailbox quota in bytes, 0 = unlimited (default: mailbox.quota)")
    p.set_defaults(func=cmd_add)

    p = subparsers.add_parser("passwd", parents=[common_parent],
                              help="set an account's password")
    p.add_argument("address", metavar="ADDRESS")
    _password_stdin(p)
    p.set_defaults(func=cmd_passwd)

    p = subparsers.add_parser("del", parents=[common_parent], help="remove an account",
                              description="Remove an account (its mailbox is kept).")
    p.add_argument("address", metavar="ADDRESS")
    p.set_defaults(func=cmd_del)

    p = subparsers.add_parser("list", parents=[common_parent],
                              help="list accounts with their store and quota")
    p.set_defaults(func=cmd_list)


def _password_stdin(parser):
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input "
                             "instead of prompting")
    # Not an option: a trap, so that "--password SECRET" is refused without argparse
    # echoing SECRET back as an "unrecognized argument".
    parser.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)


class _RefusePassword(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("there is no --password option (a password on the command line is "
                     "visible to other users and kept in shell history); use --password-stdin "
                     "or answer the prompt")


def _quota(text):
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes (0 = unlimited)")
    return int(text)


# --------------------------------------------------------------------------- helpers

def _cli():
    # Imported late: mailsys.cli imports this module while building its parser.
    from mailsys import cli
    return cli


def _address(text):
    """``(canonical address, normalised key, domain)`` or CommandError status 2."""
    cli = _cli()
    local, domain, problem = accounts._check_address(text.strip())
    if problem:
        raise cli.CommandError(f"{problem}; give the address as local@domain",
                               cli.EXIT_USAGE)
    return f"{local}@{domain}", accounts._key(local, domain), domain


def _read_password(args) -> str:
    cli = _cli()
    if args.password_stdin:
        line = sys.stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
        password = line
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password (again): ")
        except EOFError:
            raise cli.CommandError("no password was entered; type it at the prompt or "
                                   "pipe it in with --password-stdin") from None
        if password != again:
            raise cli.CommandError("the two passwords do not match; run the command again "
                                   "and type the same password twice")
    if not password:
        raise cli.CommandError("an empty password is refused; give a non-empty password")
    return password


def _users_path(config) -> str:
    path = config.accounts.users
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
            os.chmod(parent, 0o700)
        except OSError as e:
            cli = _cli()
            raise cli.CommandError(f"cannot create {parent} ({e.strerror}); create it or "
                                   "point accounts.users elsewhere") from None
    return path


def _update(path, change):
    cli = _cli()
    try:
        return accounts.update_users(path, change)
    except AccountsError as e:
        raise cli.CommandError(f"{e}; fix that line of the users file and run the "
                               "command again", cli.EXIT_USAGE) from None
    except OSError as e:
        raise cli.CommandError(f"cannot write {path} ({e.strerror}); check its directory's "
                               "permissions or run as the user owning it") from None


def _no_such_user(address):
    return _cli().CommandError(f"there is no account {address}; check the spelling with "
                               "`mailsys user list`, or add it with `mailsys user add`")


# --------------------------------------------------------------------------- commands

def cmd_add(args):
    cli = _cli()
    config = cli.load_config(args)
    address, key, domain = _address(args.address)
    if domain not in config.domains.local:
        local = ", ".join(config.domains.local) or "(none)"
        where = (f"in {config.source}" if os.path.isabs(config.source)
                 else "in a configuration file passed with --config")
        raise cli.CommandError(
            f"{domain} is not a local domain (domains.local: {local}); add it to "
            f"domains.local {where} or use an address at a local domain", cli.EXIT_USAGE)
    path = _users_path(config)
    try:
        existing = accounts.read_users(path)
    except AccountsError as e:
        raise cli.CommandError(f"{e}; fix that line of the users file and run the command "
                               "again", cli.EXIT_USAGE) from None
    if key in existing:
        raise cli.CommandError(f"{existing[key].address} already exists; change its password "
                               "with `mailsys user passwd` or remove it with `mailsys user del`")
    user = User(address, accounts.hash_password(_read_password(args)), args.store, args.quota)

    def change(users):
        if key in users:  # added by someone else while we were prompting
            raise cli.CommandError(f"{users[key].address} already exists; change its password "
                                   "with `mailsys user passwd`")
        users[key] = user

    _update(path, change)
    print(f"added {address}")
    return cli.EXIT_OK


def cmd_passwd(args):
    cli = _cli()
    config = cli.load_config(args)
    address, key, _ = _address(args.address)
    path = config.accounts.users
    try:
        if key not in accounts.read_users(path):
            raise _no_such_user(address)
    except AccountsError as e:
        raise cli.CommandError(f"{e}; fix that line of the users file and run the command "
                               "again", cli.EXIT_USAGE) from None
    new_hash = accounts.hash_password(_read_password(args))

    def change(users):
        if key not in users:
            raise _no_such_user(address)
        old = users[key]
        users[key] = User(old.address, new_hash, old.store, old.quota)

    new = _update(path, change)
    print(f"changed the password of {new[key].address}")
    return cli.EXIT_OK


def cmd_del(args):
    cli = _cli()
    config = cli.load_config(args)
    address, key, _ = _address(args.address)
    removed = []

    def change(users):
        if key not in users:
            raise _no_such_user(address)
        removed.append(users.pop(key))

    if not os.path.exists(config.accounts.users):
        raise _no_such_user(address)
    _update(config.accounts.users, change)
    print(f"removed {removed[0].address} (its mailbox, if any, is kept)")
    _warn_dangling_aliases(config, removed[0])
    return cli.EXIT_OK


def _warn_dangling_aliases(config, user):
    """Tell the operator about aliases that still name the removed account."""
    try:
        with open(config.accounts.aliases, encoding="utf-8") as f:
            aliases = accounts.parse_aliases(f.read(), config.accounts.aliases)
    except (OSError, UnicodeDecodeError, AccountsError):
        return
    local = user.address.rpartition("@")[0].casefold()
    wanted = {user.address.casefold(), local}
    names = [a.name for table in (aliases.exact, aliases.bare, aliases.catchall)
             for a in table.values() if any(t.casefold() in wanted for t in a.targets)]
    if names:
        print(f"mailsys: note: {config.accounts.aliases} still names {user.address} in "
              f"{', '.join(names)}; edit those aliases", file=sys.stderr)


def cmd_list(args):
    cli = _cli()
    config = cli.load_config(args)
    try:
        users = accounts.read_users(config.accounts.users)
    except AccountsError as e:
        raise cli.CommandError(f"{e}; fix that line of the users file", cli.EXIT_USAGE) from None
    for user in sorted(users.values(), key=_sort_key):
        print(format_listing(user, config.mailbox.default_store, config.mailbox.quota))
    return cli.EXIT_OK


def _sort_key(user):
    local, _, domain = user.address.rpartition("@")
    return (domain, local.casefold())


def format_listing(user, default_store, default_quota):
    """``ADDRESS store=STORE quota=BYTES``: the effective values, ``(default)`` marking
    those inherited from ``[mailbox]``; quota 0 means unlimited."""
    store = user.store if user.store is not None else f"{default_store}(default)"
    quota = user.quota if user.quota is not None else f"{default_quota}(default)"
    return f"{user.address} store={store} quota={quota}"
