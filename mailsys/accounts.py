"""Users, password hashes and aliases (CONTRACT section 3); reloads on change.

A leaf module: it knows no protocol.  The SMTP policy asks :meth:`Accounts.accepts`,
the queue asks :meth:`Accounts.expand`, AUTH and POP3 ask :meth:`Accounts.check_password`
(in a thread: it is CPU-heavy), the submission policy asks :meth:`Accounts.owns`.

Two files, both plain text:

``users``
    ``ADDRESS:{SCHEME}HASH[:OPTION=VALUE,...]`` one account a line; ``#`` comment lines.
``aliases``
    aliases(5) style: ``name: target, target, ...``; continuation lines start with
    white space; ``#`` comments (whole lines, or after white space at the end of a line).

See docs/accounts.rst for the semantics (lookup order, plus-addressing, bare names, catch-alls).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import argon2
import bcrypt
from twisted.logger import Logger

from mailsys.files import write_atomically

__all__ = [
    "AccountsError", "User", "Alias", "Aliases", "Expansion", "Accounts",
    "STORES", "SCHEMES", "PASSWORD_HASHER",
    "split_address", "normalise", "canonical",
    "parse_users", "format_user", "format_users", "read_users",
    "write_users_atomically", "write_text_atomically", "update_users",
    "parse_aliases", "hash_password", "verify_password",
]

log = Logger(namespace="mailsys.accounts")

STORES = ("maildir", "mbox")
ARGON2ID, BLF_CRYPT = "{ARGON2ID}", "{BLF-CRYPT}"
SCHEMES = (ARGON2ID, BLF_CRYPT)

#: The hasher for every new hash.  argon2-cffi's defaults are RFC 9106's "low memory"
#: profile: Argon2id, t=3, m=65536 KiB, p=4 -- the parameters in the CONTRACT example.
#: Tests replace this with a cheap one; verification always uses the parameters stored in
#: the hash itself, so hashes made with other parameters keep verifying.
PASSWORD_HASHER = argon2.PasswordHasher()

USERS_HEADER = (
    "# mailsys users: one account a line, written by `mailsys user add|passwd|del`.\n"
    "#   ADDRESS:{SCHEME}HASH[:store=maildir|mbox,quota=BYTES]\n"
    "# See docs/accounts.rst.\n"
)

_ARGON2ID_RE = re.compile(
    r"\$argon2id\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}")
_BCRYPT_RE = re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_SCHEME_RE = re.compile(r"\{([^{}]*)\}")
_QUOTA_RE = re.compile(r"[0-9]+")
# Characters never allowed in an account or alias address: white space, controls, the
# separators of our own files, and "/" (addresses become mailbox paths).
_BAD_ADDRESS_CHARS = re.compile(r"[\s\x00-\x1f\x7f:,/\\\"]")
_DOMAIN_RE = re.compile(r"[^\s\x00-\x20\x7f@/\\:,#\"\[\]]+")
_MAX_ALIAS_DEPTH = 32


class AccountsError(Exception):
    """A malformed users or aliases file; the message is ``FILE:LINE: problem`` for
    its first bad line.  ``problems`` holds ``(line, problem)`` for every bad line
    the parser found (line 0: the file as a whole), so that ``mailsys config check``
    can name them all in one run instead of one per fix."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = tuple(problems)


def _refuse(source, problems):
    """Raise the AccountsError for ``problems`` (``(line, problem)``, in file order)."""
    line, problem = problems[0]
    more = len(problems) - 1
    tail = (f" (and {more} more bad line{'s' if more > 1 else ''}; `mailsys config check` "
            "lists them)") if more else ""
    raise AccountsError(f"{source}:{line}: {problem}{tail}", problems)


# --------------------------------------------------------------------------- addresses

def split_address(address: str) -> tuple[str, str]:
    """``(local part as written, lowercase domain)``; ValueError if it is no address."""
    if not isinstance(address, str):
        raise ValueError("not an address")
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an address of the form local@domain")
    return local, domain.lower()


def canonical(address: str) -> str:
    """The display form: local part as written, ``@``, lowercase domain."""
    local, domain = split_address(address)
    return f"{local}@{domain}"


def normalise(address: str) -> str:
    """The lookup key: casefolded local part ``@`` lowercase domain."""
    local, domain = split_address(address)
    return f"{local.casefold()}@{domain}"


def _key(local: str, domain: str) -> str:
    return f"{local.casefold()}@{domain}"


def _plus_base(local: str) -> str | None:
    """``bob`` for ``bob+tag``; None when there is no (usable) extension."""
    base, plus, _ = local.partition("+")
    return base if plus and base else None


def _check_local(local: str) -> str | None:
    """A problem with a local part (of an account or alias), or None."""
    if not local:
        return "empty local part"
    if _BAD_ADDRESS_CHARS.search(local):
        return f"local part {local!r} contains white space, a control character or one of : , / \\ \""
    if local.startswith("#"):
        return f"local part {local!r} starts with '#' (the line would be a comment)"
    if local in (".", "..") or local.startswith(".") or local.endswith(".") or ".." in local:
        return f"local part {local!r} has a misplaced dot"
    return None


def _check_domain(domain: str) -> str | None:
    if not domain:
        return "empty domain"
    if not _DOMAIN_RE.fullmatch(domain) or domain.startswith(".") or ".." in domain:
        return f"domain {domain!r} is not a valid domain name"
    return None


def _check_address(address: str) -> tuple[str, str, str | None]:
    local, at, domain = address.rpartition("@")
    if not at:
        return "", "", f"{address!r} is not an address of the form local@domain"
    domain = domain.lower()
    problem = _check_local(local) or _check_domain(domain)
    return local, domain, problem


# --------------------------------------------------------------------------- users

@dataclass(frozen=True)
class User:
    address: str          # canonical: local part as written @ lowercase domain
    password_hash: str    # "{ARGON2ID}$argon2id$..." or "{BLF-CRYPT}$2y$..."
    store: str | None = None   # "maildir" | "mbox" | None (= mailbox.default_store)
    quota: int | None = None   # bytes (0 = unlimited), None = mailbox.quota

    def __repr__(self):  # keep hashes out of tracebacks and logs
        return f"User(address={self.address!r}, store={self.store!r}, quota={self.quota!r})"

    @property
    def key(self) -> str:
        return normalise(self.address)


def _check_hash(value: str) -> tuple[str | None, str | None]:
    """``(hash with canonical scheme, problem)``."""
    m = _SCHEME_RE.match(value)
    if not m:
        return None, "the password hash has no {SCHEME} prefix (expected {ARGON2ID} or {BLF-CRYPT})"
    scheme = "{" + m.group(1).upper() + "}"
    body = value[m.end():]
    if scheme == ARGON2ID:
        if not _ARGON2ID_RE.fullmatch(body):
            return None, "malformed {ARGON2ID} hash (expected $argon2id$v=19$m=...,t=...,p=...$SALT$HASH)"
    elif scheme == BLF_CRYPT:
        if not _BCRYPT_RE.fullmatch(body):
            return None, "malformed {BLF-CRYPT} hash (expected $2y$NN$ and 53 characters)"
    else:
        return None, (f"unsupported password scheme {{{m.group(1)}}}: only {{ARGON2ID}} and "
                      "{BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`")
    return scheme + body, None


def _parse_options(text: str) -> tuple[dict, str | None]:
    options: dict = {}
    for item in text.split(","):
        item = item.strip()
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not item:
            return options, "empty option (options are OPTION=VALUE separated by commas)"
        if not eq:
            return options, f"option {name!r} has no value (expected OPTION=VALUE)"
        if name in options:
            return options, f"option {name!r} given twice"
        if name == "store":
            if value not in STORES:
                return options, f"store={value!r}: expected maildir or mbox"
            options["store"] = value
        elif name == "quota":
            if not _QUOTA_RE.fullmatch(value):
                return options, f"quota={value!r}: expected a number of bytes (0 = unlimited)"
            options["quota"] = int(value)
        else:
            return options, f"unknown option {name!r} (known: store, quota)"
    return options, None


def _parse_user_line(line: str) -> tuple[User | None, str | None]:
    address, colon, rest = line.partition(":")
    address = address.strip()
    if not colon:
        return None, "expected ADDRESS:{SCHEME}HASH[:OPTION=VALUE,...]"
    local, domain, problem = _check_address(address)
    if problem:
        return None, problem
    # Neither scheme's hash contains ":", so a second ":" can only start the options.
    fields = rest.split(":")
    pw_hash, problem = _check_hash(fields[0].strip())
    if problem:
        return None, problem
    options: dict = {}
    if len(fields) > 2:
        if not all(f.strip() == "" or f.strip().isdigit() for f in fields[1:3]):
            return None, ("too many ':'-separated fields (expected ADDRESS:{SCHEME}HASH[:OPTIONS], "
                          "or a Dovecot passwd-file line, whose uid and gid are numbers or empty)")
        # A line of a Dovecot passwd-file as it is (CONTRACT section 3: they can be
        # imported): user:password:uid:gid:gecos:home:shell:extra_fields.  Only the
        # password means anything here; the mailbox is under [mailbox] root, so
        # uid, gid, home, shell and Dovecot's extra fields are left aside.
        return User(f"{local}@{domain}", pw_hash, None, None), None
    if len(fields) == 2:
        options, problem = _parse_options(fields[1])
        if problem:
            return None, problem
    return User(f"{local}@{domain}", pw_hash, options.get("store"), options.get("quota")), None


def _iter_user_lines(text: str):
    """``(lineno, raw line, stripped content or None for comments/blank)``."""
    for lineno, raw in enumerate(text.splitlines(keepends=True), 1):
        content = raw.strip()
        yield lineno, raw, (None if not content or content.startswith("#") else content)


def parse_users(text: str, source: str) -> dict[str, User]:
    """Parse a users file; keys are :func:`normalise`\\ d addresses, in file order."""
    users: dict[str, User] = {}
    where: dict[str, int] = {}
    problems = []
    for lineno, _raw, content in _iter_user_lines(text):
        if content is None:
            continue
        user, problem = _parse_user_line(content)
        if problem is None and user.key in users:
            problem = f"duplicate account {user.address} (first at line {where[user.key]})"
        if problem:
            problems.append((lineno, problem))
            continue
        users[user.key] = user
        where[user.key] = lineno
    if problems:
        _refuse(source, problems)
    return users


def format_user(user: User) -> str:
    """One users-file line, without the newline.  ValueError for a User that would not
    read back as itself (bad address, hash, store or quota)."""
    problem = (_check_address(user.address)[2] or _check_hash(user.password_hash)[1])
    if problem is None and user.store not in (None, *STORES):
        problem = f"store={user.store!r}: expected maildir or mbox"
    if problem is None and user.quota is not None and (
            type(user.quota) is not int or user.quota < 0):
        problem = f"quota={user.quota!r}: expected a number of bytes (0 = unlimited)"
    if problem is None and user.address != canonical(user.address):
        problem = f"{user.address!r} is not canonical (the domain must be lowercase)"
    if problem:
        raise ValueError(problem)
    options = []
    if user.store is not None:
        options.append(f"store={user.store}")
    if user.quota is not None:
        options.append(f"quota={user.quota}")
    line = f"{user.address}:{user.password_hash}"
    return line + (":" + ",".join(options) if options else "")


def _as_users(users) -> list[User]:
    return list(users.values()) if isinstance(users, Mapping) else list(users)


def format_users(users: Iterable[User]) -> str:
    """A users file (no comments) holding ``users`` in the given order."""
    return "".join(format_user(u) + "\n" for u in _as_users(users))


def read_users(path: str) -> dict[str, User]:
    """Parse the users file at ``path``; a missing file is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise AccountsError(f"{path}:0: cannot read: {e}") from None
    return parse_users(text, path)


#: ``mailsys config check`` names at most this many bad lines of one file.
SHOWN_PROBLEMS = 20


def file_problems(path: str, kind: str) -> list[tuple[int | None, str]]:
    """Why the server would refuse to start on the ``kind`` ("users" or "aliases")
    file at ``path``: ``(line, problem)`` for each bad line, line None for the file
    as a whole; empty when it would start.  Read as :class:`Accounts` reads it at
    start (a missing file is empty), for ``mailsys config check``.  Past
    :data:`SHOWN_PROBLEMS` lines, the last entry counts the rest (a binary file
    named by mistake would otherwise fill the screen)."""
    parse = parse_users if kind == "users" else parse_aliases
    if os.path.isdir(path):
        return [(None, f"{path} is a directory; point accounts.{kind} at the {kind} file "
                       "(it need not exist yet)")]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        return [(None, f"cannot read {path}: {e.strerror}; let the server's user read it "
                       f"or point accounts.{kind} elsewhere")]
    except UnicodeDecodeError as e:
        return [(None, f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it "
                       "as UTF-8")]
    try:
        parse(text, path)
    except AccountsError as e:
        found = [(line, problem if ";" in problem else f"{problem}; fix that line")
                 for line, problem in e.problems[:SHOWN_PROBLEMS]]
        rest = len(e.problems) - SHOWN_PROBLEMS
        if rest > 0:
            found.append((None, f"{rest} more bad line{'s' if rest > 1 else ''} not shown; "
                                "fix the ones above and check again"))
        return found
    return []


def write_text_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` atomically (mailsys.files), keeping an existing
    file's owner and group."""
    write_atomically(path, text.encode("utf-8"), mode, keep_owner=True)


def write_users_atomically(path: str, users) -> None:
    """Write ``users`` (Users or a mapping of them) to ``path`` atomically, mode 0600."""
    write_text_atomically(path, format_users(users))


@contextlib.contextmanager
def _directory_lock(directory: str):
    """Serialise concurrent ``mailsys user`` runs (flock on the directory itself)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_users(path: str, change: Callable[[dict[str, User]], None]) -> dict[str, User]:
    """Read-modify-write the users file under a lock, keeping comments and line order.

    ``change`` mutates a dict (normalised address -> User); removed keys lose their line,
    changed users get their line rewritten in place, new users are appended.  The file is
    written atomically, mode 0600, or the old file's mode without its bits for others
    (0640 for a server that reads it through its group).  A symbolic link is followed: the
    file it names is replaced and the link stays.  Returns the new dict.  Raises
    AccountsError if the current file is malformed (nothing is written then)."""
    path = os.path.realpath(path)
    with _directory_lock(os.path.dirname(path)):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = USERS_HEADER
        except (OSError, UnicodeDecodeError) as e:
            raise AccountsError(f"{path}:0: cannot read: {e}") from None
        old = parse_users(text, path)
        new = dict(old)
        change(new)
        out = []
        for _lineno, raw, content in _iter_user_lines(text):
            if content is None:
                out.append(raw if raw.endswith("\n") else raw + "\n")
                continue
            user, _ = _parse_user_line(content)
            if user.key not in new:
                continue
            if new[user.key] != user:
                out.append(format_user(new[user.key]) + "\n")
            else:
                out.append(raw if raw.endswith("\n") else raw + "\n")
        out.extend(format_user(u) + "\n" for k, u in new.items() if k not in old)
        write_text_atomically(path, "".join(out), _kept_mode(path))
        return new


def _kept_mode(path: str) -> int:
    """The mode for a rewritten users file: the old file's, less anything for others
    (the hashes are nobody else's business), so a server that reads it through its
    group keeps reading it; 0600 for a new file."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o600
    return mode & 0o770


# --------------------------------------------------------------------------- passwords

def hash_password(password: str) -> str:
    """A new ``{ARGON2ID}`` hash (argon2-cffi, :data:`PASSWORD_HASHER`)."""
    if not password:
        raise ValueError("refusing to hash an empty password")
    return ARGON2ID + PASSWORD_HASHER.hash(password)


def verify_password(stored: str, password: str | bytes) -> bool:
    """True if ``password`` matches ``stored`` (``{ARGON2ID}`` or ``{BLF-CRYPT}``).

    Any other scheme, a missing scheme or a malformed hash is False: no plaintext or
    unsalted scheme is ever accepted.  Never raises for bad input."""
    if not isinstance(stored, str) or not isinstance(password, (str, bytes)):
        return False
    secret = password.encode("utf-8") if isinstance(password, str) else password
    m = _SCHEME_RE.match(stored)
    if not m:
        return False
    scheme, body = "{" + m.group(1).upper() + "}", stored[m.end():]
    try:
        if scheme == ARGON2ID:
            # argon2-cffi would also verify $argon2i$/$argon2d$: insist on the id variant.
            if not _ARGON2ID_RE.fullmatch(body):
                return False
            return PASSWORD_HASHER.verify(body, secret)
        if scheme == BLF_CRYPT:
            if not _BCRYPT_RE.fullmatch(body):
                return False
            # bcrypt only ever looks at the first 72 bytes (as Dovecot's crypt does).
            return bcrypt.checkpw(secret[:72], body.encode("ascii"))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError,
            ValueError, TypeError):
        return False
    return False


_dummy_lock = threading.Lock()
_dummy: tuple[object, str] | None = None


def _dummy_hash() -> str:
    """An Argon2id hash of a random secret, made once (per hasher) on first use."""
    global _dummy
    with _dummy_lock:
        if _dummy is None or _dummy[0] is not PASSWORD_HASHER:
            _dummy = (PASSWORD_HASHER, ARGON2ID + PASSWORD_HASHER.hash(secrets.token_hex(16)))
        return _dummy[1]


# --------------------------------------------------------------------------- aliases

@dataclass(frozen=True)
class Alias:
    name: str                 # "sales", "sales@example.com" or "@example.org", as written
    targets: tuple[str, ...]  # "alice", "bob@example.org" (domain lowercased)
    line: int


@dataclass(frozen=True)
class Aliases:
    exact: Mapping[str, Alias] = field(default_factory=dict)     # "local_cf@domain"
    bare: Mapping[str, Alias] = field(default_factory=dict)      # "local_cf"
    catchall: Mapping[str, Alias] = field(default_factory=dict)  # "domain"

    def __len__(self):
        return len(self.exact) + len(self.bare) + len(self.catchall)


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# ...`` that follows white space."""
    m = re.search(r"\s#", line)
    return line[:m.start()] if m else line


def _parse_alias_name(name: str) -> tuple[str, str, str | None]:
    """``(kind, key, problem)``; kind is "exact", "bare" or "catchall"."""
    if not name:
        return "", "", "missing alias name before ':'"
    if name.startswith("@"):
        domain = name[1:].lower()
        problem = _check_domain(domain)
        return "catchall", domain, (f"catch-all {name!r}: {problem}" if problem else None)
    if "@" in name:
        local, domain, problem = _check_address(name)
        return "exact", _key(local, domain), problem
    return "bare", name.casefold(), _check_local(name)


def _parse_alias_target(target: str) -> tuple[str | None, str | None]:
    if not target:
        return None, "empty target (two commas in a row, or a trailing comma at the end)"
    if target[0] in "|/\"" or target.lower().startswith(":include:"):
        return None, (f"target {target!r}: pipes, files, :include: and quoted targets are not "
                      "supported; targets are addresses")
    if any(c.isspace() for c in target):
        return None, f"target {target!r} contains white space (separate targets with commas)"
    if target.startswith("@"):
        return None, f"target {target!r} has no local part"
    if "@" in target:
        local, domain, problem = _check_address(target)
        return (None, problem) if problem else (f"{local}@{domain}", None)
    problem = _check_local(target)
    return (None, problem) if problem else (target, None)


def parse_aliases(text: str, source: str) -> Aliases:
    """Parse an aliases file; AccountsError ``FILE:LINE: problem`` naming its first
    bad line, with every bad line in ``problems``."""
    problems = []
    entries: list[tuple[int, str]] = []   # (first line number, logical line)
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        content = _strip_comment(raw).rstrip()
        if raw[0] in " \t":
            if not entries:
                problems.append((lineno, "continuation line (starts with white space) before "
                                 "any alias; remove the leading white space"))
                continue
            first, logical = entries[-1]
            entries[-1] = (first, logical + " " + content.strip())
        else:
            entries.append((lineno, content))

    exact: dict[str, Alias] = {}
    bare: dict[str, Alias] = {}
    catchall: dict[str, Alias] = {}
    tables = {"exact": exact, "bare": bare, "catchall": catchall}
    for lineno, logical in entries:
        problem = _parse_alias_entry(logical, lineno, tables)
        if problem:
            problems.append((lineno, problem))
    if problems:
        problems.sort(key=lambda found: found[0])
        _refuse(source, problems)
    return Aliases(exact, bare, catchall)


def _parse_alias_entry(logical, lineno, tables):
    """Enter one logical line into its table; the problem with it, or None."""
    name, colon, rest = logical.partition(":")
    name = name.strip()
    if not colon:
        return "expected 'name: target, target, ...'"
    kind, key, problem = _parse_alias_name(name)
    if problem:
        return problem
    table = tables[kind]
    if key in table:
        return f"duplicate alias {name!r} (first at line {table[key].line})"
    if not rest.strip():
        return f"alias {name!r} has no targets"
    targets = []
    for item in rest.split(","):
        target, problem = _parse_alias_target(item.strip())
        if problem:
            return problem
        targets.append(target)
    table[key] = Alias(name, tuple(targets), lineno)
    return None


# --------------------------------------------------------------------------- Accounts

@dataclass(frozen=True)
class Expansion:
    local_users: tuple[str, ...] = ()   # canonical user addresses, deduplicated, in order
    remote: tuple[str, ...] = ()        # remote addresses to relay to
    errors: tuple[str, ...] = ()        # one line each: alias loops, unknown local targets
    #: Alias targets in our domains that are nobody (a typo in the aliases file):
    #: the MDA hands them to the queue, whose attempt bounces them to the sender.
    missing: tuple[str, ...] = ()
    looped: bool = False                # an error is a loop (or nesting too deep)


class _Snapshot:
    """One consistent view of both files; immutable once built (lazy caches aside)."""

    def __init__(self, users: Mapping[str, User], aliases: Aliases, local_domains: frozenset):
        self.users = users
        self.aliases = aliases
        self.local_domains = local_domains
        self._owned: dict[str, frozenset[str]] | None = None

    # A node is what an address resolves to: ("user", User) or ("alias", node id, Alias,
    # domain for bare targets); None when nothing matches.
    def resolve(self, local: str, domain: str):
        candidates = [local]
        base = _plus_base(local)
        if base is not None:
            candidates.append(base)
        for cand in candidates:
            key = _key(cand, domain)
            alias = self.aliases.exact.get(key)
            if alias is not None:
                return ("alias", key, alias, domain)
            user = self.users.get(key)
            if user is not None:
                return ("user", user)
            alias = self.aliases.bare.get(cand.casefold())
            if alias is not None:
                return ("alias", key, alias, domain)
        alias = self.aliases.catchall.get(domain)
        if alias is not None:
            return ("alias", "@" + domain, alias, domain)
        return None

    def user(self, local: str, domain: str) -> User | None:
        user = self.users.get(_key(local, domain))
        if user is None and (base := _plus_base(local)) is not None:
            user = self.users.get(_key(base, domain))
        return user

    def expand(self, address: str) -> Expansion:
        local_users: dict[str, None] = {}
        remote: dict[str, str] = {}
        errors: list[str] = []
        missing: dict[str, str] = {}
        looped = False
        done: set[str] = set()

        def visit(addr: str, path: list[str]):
            local, domain = split_address(addr)
            shown = f"{local}@{domain}"
            if domain not in self.local_domains:
                remote.setdefault(_key(local, domain), shown)
                return
            node = self.resolve(local, domain)
            trail = " -> ".join(path + [shown])
            if node is None:
                errors.append(f"{trail}: no such local user or alias")
                if path:
                    missing.setdefault(_key(local, domain), shown)
                return
            if node[0] == "user":
                local_users.setdefault(node[1].address)
                return
            nonlocal looped
            _, node_id, alias, alias_domain = node
            if node_id in path_ids:
                # A self-reference ("alice@d: alice@d, archive@x") means the account itself.
                user = self.user(local, domain)
                if user is not None:
                    local_users.setdefault(user.address)
                elif node_id.startswith("@"):
                    errors.append(f"{trail}: no such local user or alias "
                                  f"(catch-all @{domain} points back at its own domain)")
                else:
                    errors.append(f"alias loop: {trail}")
                    looped = True
                return
            if node_id in done:
                return
            if len(path) >= _MAX_ALIAS_DEPTH:
                errors.append(f"{trail}: aliases nested more than {_MAX_ALIAS_DEPTH} deep")
                looped = True
                return
            done.add(node_id)
            path_ids.add(node_id)
            for target in alias.targets:
                if "@" not in target:
                    target = f"{target}@{alias_domain}"
                visit(target, path + [shown])
            path_ids.discard(node_id)

        path_ids: set[str] = set()
        try:
            visit(address, [])
        except ValueError as e:
            errors.append(str(e))
        return Expansion(tuple(local_users), tuple(remote.values()), tuple(errors),
                         tuple(missing.values()), looped)

    def owned(self) -> dict[str, frozenset[str]]:
        if self._owned is None:
            owned: dict[str, set[str]] = {key: {key} for key in self.users}
            candidates = [k for k in self.aliases.exact if k.rpartition("@")[2] in self.local_domains]
            candidates += [f"{local}@{d}" for local in self.aliases.bare for d in sorted(self.local_domains)]
            for address in candidates:
                for user_address in self.expand(address).local_users:
                    owned[normalise(user_address)].add(address)
            self._owned = {k: frozenset(v) for k, v in owned.items()}
        return self._owned


class _Clock:
    @staticmethod
    def seconds() -> float:
        return time.monotonic()


@dataclass
class _Watched:
    path: str
    parse: Callable[[str, str], object]
    empty: object
    signature: tuple | None = None
    data: object = None


class Accounts:
    """The users and aliases files, reloaded when they change.

    Every lookup first calls :meth:`refresh`, which re-stats the files at most every
    ``check_interval`` seconds of ``clock`` (an object with ``.seconds()``, e.g. the
    reactor or a ``task.Clock``; default ``time.monotonic``).  Thread-safe: lookups read
    one immutable snapshot."""

    def __init__(self, users_path, aliases_path, local_domains, *, clock=None,
                 check_interval=1.0):
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self._clock = clock if clock is not None else _Clock()
        self._interval = check_interval
        self._lock = threading.Lock()
        self._users = _Watched(os.fspath(users_path), parse_users, {})
        self._aliases = _Watched(os.fspath(aliases_path), parse_aliases, Aliases())
        for w in (self._users, self._aliases):
            self._load(w, strict=True)
        self._snapshot = _Snapshot(self._users.data, self._aliases.data, self.local_domains)
        self._last_check = self._clock.seconds()
        self._warn_postmaster()
        self._warn_foreign()

    @property
    def users_path(self) -> str:
        return self._users.path

    @property
    def aliases_path(self) -> str:
        return self._aliases.path

    # -- loading

    @staticmethod
    def _signature(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, w: _Watched, strict: bool) -> bool:
        """(Re)load ``w`` if its signature changed; True if its data changed."""
        try:
            signature = self._signature(w.path)
        except OSError as e:
            problem = AccountsError(f"{w.path}:0: cannot stat: {e.strerror}")
            if strict:
                raise problem from None
            log.error("{problem}; keeping the previous data", problem=str(problem))
            return False
        if w.data is not None and signature == w.signature:
            return False
        try:
            if signature is None:
                data = w.empty
            else:
                with open(w.path, encoding="utf-8") as f:
                    data = w.parse(f.read(), w.path)
        except (OSError, UnicodeDecodeError, AccountsError) as e:
            if isinstance(e, AccountsError):
                problem = str(e)
            elif isinstance(e, OSError) and e.errno == errno.ENOENT:
                # Vanished between stat and open: next check sees it missing.
                return False
            else:
                problem = f"{w.path}:0: cannot read: {e}"
            if strict:
                raise AccountsError(problem) from None
            w.signature = signature   # log once per bad version, not once per check
            log.error("{problem}; keeping the previous data until the file is fixed",
                      problem=problem)
            return False
        w.signature, w.data = signature, data
        if not strict:
            log.info("reloaded {path}", path=w.path)
        return True

    def refresh(self) -> None:
        """Reload changed files (at most every ``check_interval`` seconds).  Never raises:
        a malformed file keeps the previous good data and logs an error."""
        now = self._clock.seconds()
        if now - self._last_check < self._interval:
            return
        with self._lock:
            if now - self._last_check < self._interval:
                return
            self._last_check = now
            changed = False
            for w in (self._users, self._aliases):
                try:
                    changed |= self._load(w, strict=False)
                except Exception:   # pragma: no cover - defensive: callers must not see it
                    log.failure("unexpected error reloading {path}", path=w.path)
            if changed:
                self._snapshot = _Snapshot(self._users.data, self._aliases.data,
                                           self.local_domains)
                self._warn_postmaster()
                self._warn_foreign()

    def _current(self) -> _Snapshot:
        self.refresh()
        return self._snapshot

    def snapshot(self) -> object:
        """The current view of both files (checked for changes first, as every
        lookup is); a new object whenever either file changed, so callers may
        key their own derived caches on its identity (mailsys.mda.lmtp.MDA)."""
        return self._current()

    def _warn_postmaster(self):
        snap = self._snapshot
        for domain in sorted(self.local_domains):
            if snap.resolve("postmaster", domain) is None:
                log.warn("postmaster@{domain} is accepted (RFC 5321 4.5.1) but is no user or "
                         "alias, so its mail bounces; add a postmaster alias to {path}",
                         domain=domain, path=self._aliases.path)

    def _warn_foreign(self):
        """Entries at a domain that is not in [domains] local are never looked at
        (mail for such a domain is relayed or refused before any account or
        alias is asked): say so once per load, rather than let an administrator
        wonder why ``sales@other.example`` gets "Relay access denied"."""
        snap = self._snapshot
        for user in snap.users.values():
            domain = user.address.rpartition("@")[2]
            if domain not in self.local_domains:
                log.warn("{path}: account {address} is at {domain}, which is not in [domains] "
                         "local: no mail reaches it until that domain is added there",
                         path=self._users.path, address=user.address, domain=domain)
        aliases = snap.aliases
        for key, alias in list(aliases.exact.items()) + [(f"@{d}", a) for d, a in
                                                         aliases.catchall.items()]:
            domain = key.rpartition("@")[2]
            if domain not in self.local_domains:
                log.warn("{path}:{line}: alias {name} is at {domain}, which is not in [domains] "
                         "local: it is never used", path=self._aliases.path, line=alias.line,
                         name=alias.name, domain=domain)

    # -- lookups

    def users(self) -> tuple[User, ...]:
        """Every account, in file order."""
        return tuple(self._current().users.values())

    def user(self, address) -> User | None:
        """The account for ``address``: exact, else ``bob`` for ``bob+tag``."""
        try:
            local, domain = split_address(address)
        except ValueError:
            return None
        return self._current().user(local, domain)

    def is_local_domain(self, domain) -> bool:
        return isinstance(domain, str) and domain.lower() in self.local_domains

    def accepts(self, address) -> bool:
        """Whether mail for ``address`` (at a local domain) has somewhere to go: a user,
        an alias, a catch-all, or postmaster (always accepted, RFC 5321 4.5.1)."""
        try:
            local, domain = split_address(address)
        except ValueError:
            return False
        if domain not in self.local_domains:
            return False
        if local.casefold() == "postmaster":
            return True
        return self._current().resolve(local, domain) is not None

    def expand(self, address) -> Expansion:
        """Resolve ``address`` to local accounts and remote addresses."""
        return self._current().expand(address)

    def owned_addresses(self, user_address) -> frozenset[str]:
        """Normalised addresses (casefolded local part) the account may send as: itself
        plus every alias address whose expansion includes it.  Catch-alls are excluded.
        Empty for an unknown account."""
        try:
            key = normalise(user_address)
        except ValueError:
            return frozenset()
        return self._current().owned().get(key, frozenset())

    def owns(self, user_address, address) -> bool:
        """Whether the account ``user_address`` may use ``address`` as sender: one of its
        :meth:`owned_addresses`, or ``that+tag`` when ``that+tag`` is nobody else's."""
        owned = self.owned_addresses(user_address)
        try:
            local, domain = split_address(address)
        except ValueError:
            return False
        if _key(local, domain) in owned:
            return True
        base = _plus_base(local)
        if base is None or _key(base, domain) not in owned:
            return False
        snap = self._current()
        key = _key(local, domain)
        taken = (key in snap.users or key in snap.aliases.exact
                 or local.casefold() in snap.aliases.bare)
        return not taken

    def check_password(self, address, password) -> bool:
        """Verify ``password`` for the account ``address`` (exact address, no +tag).

        Constant effort: an unknown account is checked against a dummy Argon2id hash so
        the time taken does not tell whether it exists.  CPU-heavy: call it in a thread."""
        snap = self._current()
        user = None
        with contextlib.suppress(ValueError):
            user = snap.users.get(normalise(address))
        if user is None or not password:
            verify_password(_dummy_hash(), password if password else "x")
            return False
        return verify_password(user.password_hash, password)

