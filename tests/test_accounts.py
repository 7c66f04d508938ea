"""mailsys.accounts: users file, password hashes, aliases, reload on change."""
import os
import stat

import argon2
import bcrypt
import pytest
from twisted.internet import task

from mailsys import accounts
from mailsys.accounts import Accounts, AccountsError, Expansion, User
from tests.helpers import logged  # noqa: F401  (fixture)

FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
REAL_HASHER = accounts.PASSWORD_HASHER   # before the fixture below swaps it


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch):
    monkeypatch.setattr(accounts, "PASSWORD_HASHER", FAST_HASHER)


def argon(password="secret"):
    return accounts.hash_password(password)


def blf(password="secret", prefix=b"$2y$"):
    """A bcrypt hash the way Dovecot writes it ({BLF-CRYPT}$2y$...)."""
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    return "{BLF-CRYPT}" + (prefix + h[4:]).decode()


HASH = None


def a_hash():
    global HASH
    if HASH is None:
        HASH = "{ARGON2ID}" + FAST_HASHER.hash("pw")
    return HASH


def make(tmp_path, users="", aliases="", domains=("example.com", "example.net"), **kw):
    up, ap = tmp_path / "users", tmp_path / "aliases"
    if users is not None:
        up.write_text(users)
    if aliases is not None:
        ap.write_text(aliases)
    return Accounts(str(up), str(ap), domains, **kw)


def users_text(*addresses):
    return "".join(f"{a}:{a_hash()}\n" for a in addresses)


# --------------------------------------------------------------------------- users file

def test_contract_default_parameters():
    # The hasher for real hashes is argon2-cffi's default: the CONTRACT's m=65536,t=3,p=4.
    real = argon2.PasswordHasher()
    assert (real.memory_cost, real.time_cost, real.parallelism) == (65536, 3, 4)
    assert real.type is argon2.Type.ID
    p = REAL_HASHER
    assert (p.memory_cost, p.time_cost, p.parallelism, p.type) == (65536, 3, 4, argon2.Type.ID)


def test_parse_users_all_fields():
    h = a_hash()
    text = (f"# comment\n\n  # indented comment\nAlice@Example.COM:{h}:store=mbox,quota=104857600\n"
            f"bob@example.com:{h}\ncarol@example.net:{h}:quota=0\n")
    users = accounts.parse_users(text, "users")
    assert list(users) == ["alice@example.com", "bob@example.com", "carol@example.net"]
    alice = users["alice@example.com"]
    assert alice == User("Alice@example.com", h, "mbox", 104857600)
    assert users["bob@example.com"] == User("bob@example.com", h, None, None)
    assert users["carol@example.net"].quota == 0
    assert h not in repr(alice)


def test_format_parse_round_trip():
    users = [User("Alice@example.com", a_hash(), "mbox", 5), User("bob@example.com", blf()),
             User("c@example.net", a_hash(), None, 0), User("d@example.net", a_hash(), "maildir")]
    text = accounts.format_users(users)
    assert text.splitlines()[0] == f"Alice@example.com:{a_hash()}:store=mbox,quota=5"
    assert text.splitlines()[1].count(":") == 1
    parsed = accounts.parse_users(text, "u")
    assert list(parsed.values()) == users
    assert accounts.format_users(parsed) == text


@pytest.mark.parametrize("user", [
    User("#x@example.com", "HASH"), User("x@Example.com", "HASH"), User("x y@example.com", "HASH"),
    User("x@example.com", "{PLAIN}pw"), User("x@example.com", "HASH", store="imap"),
    User("x@example.com", "HASH", quota=-1), User("x@example.com", "HASH", quota="5"),
])
def test_format_user_refuses_what_would_not_read_back(user):
    from dataclasses import replace
    user = replace(user, password_hash=user.password_hash.replace("HASH", a_hash()))
    with pytest.raises(ValueError):
        accounts.format_user(user)


def test_argon2_hash_contains_no_colon():
    assert ":" not in accounts.hash_password("a:b:c")
    assert ":" not in argon2.PasswordHasher().hash("x")


def test_scheme_case_is_canonicalised():
    h = a_hash().replace("{ARGON2ID}", "{argon2id}")
    (user,) = accounts.parse_users(f"a@example.com:{h}\n", "u").values()
    assert user.password_hash.startswith("{ARGON2ID}$argon2id$")


BCRYPT_BODY = "$2y$05$" + "a" * 53


@pytest.mark.parametrize("line, problem", [
    ("alice@example.com", "expected ADDRESS:{SCHEME}HASH[:OPTION=VALUE,...]"),
    ("alice:{ARGON2ID}x", "'alice' is not an address of the form local@domain"),
    ("@example.com:HASH", "empty local part"),
    ("alice@:HASH", "empty domain"),
    ("al ice@example.com:HASH", "local part 'al ice' contains white space, a control character or one of : , / \\ \""),
    ("../x@example.com:HASH", "local part '../x' contains white space, a control character or one of : , / \\ \""),
    (".x@example.com:HASH", "local part '.x' has a misplaced dot"),
    ("x#@example.com:{PLAIN}x", "unsupported password scheme {PLAIN}: only {ARGON2ID} and {BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`"),
    ("a@exa/mple.com:HASH", "domain 'exa/mple.com' is not a valid domain name"),
    ("a@example.com:$argon2id$v=19", "the password hash has no {SCHEME} prefix (expected {ARGON2ID} or {BLF-CRYPT})"),
    ("a@example.com:{PLAIN}secret", "unsupported password scheme {PLAIN}: only {ARGON2ID} and {BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`"),
    ("a@example.com:{SHA}abc", "unsupported password scheme {SHA}: only {ARGON2ID} and {BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`"),
    ("a@example.com:{ARGON2ID}$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
     "malformed {ARGON2ID} hash (expected $argon2id$v=19$m=...,t=...,p=...$SALT$HASH)"),
    ("a@example.com:{BLF-CRYPT}$2y$05$short", "malformed {BLF-CRYPT} hash (expected $2y$NN$ and 53 characters)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":store=mbox:x",
     "too many ':'-separated fields (expected ADDRESS:{SCHEME}HASH[:OPTIONS], or a Dovecot passwd-file line, whose uid and gid are numbers or empty)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":store=imap", "store='imap': expected maildir or mbox"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":quota=-1", "quota='-1': expected a number of bytes (0 = unlimited)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":quota=10M", "quota='10M': expected a number of bytes (0 = unlimited)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":quota=", "quota='': expected a number of bytes (0 = unlimited)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":uid=5000", "unknown option 'uid' (known: store, quota)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":store", "option 'store' has no value (expected OPTION=VALUE)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":quota=1,quota=2", "option 'quota' given twice"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":quota=1,,store=mbox", "empty option (options are OPTION=VALUE separated by commas)"),
    ("a@example.com:{BLF-CRYPT}" + BCRYPT_BODY + ":", "empty option (options are OPTION=VALUE separated by commas)"),
])
def test_malformed_users_line(line, problem):
    line = line.replace("HASH", a_hash())
    text = f"# header\nok@example.com:{a_hash()}\n{line}\n"
    with pytest.raises(AccountsError) as e:
        accounts.parse_users(text, "/etc/mailsys/users")
    assert str(e.value) == f"/etc/mailsys/users:3: {problem}"
    # Never echo a hash (or anything after the address) into the message.
    assert a_hash() not in str(e.value)


def test_duplicate_user_case_insensitive():
    text = users_text("alice@example.com", "bob@example.com", "ALICE@Example.com")
    with pytest.raises(AccountsError) as e:
        accounts.parse_users(text, "u")
    assert str(e.value) == "u:3: duplicate account ALICE@example.com (first at line 1)"


def test_write_users_atomically(tmp_path):
    path = tmp_path / "users"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    users = {"a@example.com": User("a@example.com", a_hash())}
    accounts.write_users_atomically(str(path), users)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users"]
    assert accounts.parse_users(path.read_text(), "u") == users


def test_write_users_atomically_cleans_up_on_failure(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(accounts.os, "replace", boom)
    with pytest.raises(OSError):
        accounts.write_users_atomically(str(tmp_path / "users"), [])
    assert os.listdir(tmp_path) == []


def test_update_users_keeps_comments_and_order(tmp_path):
    path = tmp_path / "users"
    h = a_hash()
    path.write_text(f"# my comment\nb@example.com:{h}:store=mbox\n\n# about c\nc@example.com:{h}\n")
    new_hash = argon("new")

    def change(users):
        users["a@example.com"] = User("a@example.com", h)
        users["c@example.com"] = User("c@example.com", new_hash)
        del users["b@example.com"]

    os.chmod(path, 0o644)
    accounts.update_users(str(path), change)
    assert path.read_text() == (f"# my comment\n\n# about c\nc@example.com:{new_hash}\n"
                                f"a@example.com:{h}\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640     # nothing for others
    assert sorted(os.listdir(tmp_path)) == ["users"]


@pytest.mark.parametrize("before,after", [(0o640, 0o640), (0o600, 0o600), (0o604, 0o600),
                                          (0o660, 0o660), (0o666, 0o660)])
def test_update_users_keeps_the_mode_but_for_others(tmp_path, before, after):
    """A server that reads the users file through its group (root:mail 0640) kept
    reading it after `mailsys user add`: forcing 0600 cut it off, and it went on
    with the old accounts, logging that it could not read the file."""
    path = tmp_path / "users"
    path.write_text("")
    os.chmod(path, before)
    accounts.update_users(str(path), lambda users: users.update(
        {"a@example.com": User("a@example.com", a_hash())}))
    assert stat.S_IMODE(os.stat(path).st_mode) == after


def test_update_users_through_a_symbolic_link_replaces_the_file_it_names(tmp_path):
    real = tmp_path / "managed" / "users"
    real.parent.mkdir()
    real.write_text("")
    os.chmod(real, 0o600)
    link = tmp_path / "users"
    link.symlink_to(real)
    accounts.update_users(str(link), lambda users: users.update(
        {"a@example.com": User("a@example.com", a_hash())}))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert list(accounts.read_users(str(real))) == ["a@example.com"]
    assert sorted(os.listdir(real.parent)) == ["users"]


def test_update_users_refuses_malformed_file(tmp_path):
    path = tmp_path / "users"
    path.write_text("garbage\n")
    with pytest.raises(AccountsError, match=r"users:1: expected ADDRESS"):
        accounts.update_users(str(path), lambda users: None)
    assert path.read_text() == "garbage\n"


# --------------------------------------------------------------------------- passwords

def test_argon2_hash_and_verify():
    h = accounts.hash_password("correct horse")
    assert h.startswith("{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$")
    assert accounts.verify_password(h, "correct horse")
    assert accounts.verify_password(h, "correct horse".encode())
    assert not accounts.verify_password(h, "correct horsE")
    assert not accounts.verify_password(h, "")


def test_argon2_default_parameters_hash_verifies_with_any_hasher():
    h = "{ARGON2ID}" + argon2.PasswordHasher().hash("pw")
    assert "$m=65536,t=3,p=4$" in h
    assert accounts.verify_password(h, "pw")
    assert not accounts.verify_password(h, "px")


def test_empty_password_is_never_hashed():
    with pytest.raises(ValueError):
        accounts.hash_password("")


@pytest.mark.parametrize("prefix", [b"$2y$", b"$2b$", b"$2a$"])
def test_bcrypt_verify(prefix):
    h = blf("pässword", prefix)
    assert h.startswith("{BLF-CRYPT}" + prefix.decode())
    assert accounts.verify_password(h, "pässword")
    assert not accounts.verify_password(h, "password")
    assert accounts.parse_users(f"a@example.com:{h}\n", "u")["a@example.com"].password_hash == h


def test_bcrypt_long_password_uses_first_72_bytes():
    h = "{BLF-CRYPT}" + bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(rounds=4)).decode()
    assert accounts.verify_password(h, "x" * 100)
    assert not accounts.verify_password(h, "x" * 71)


@pytest.mark.parametrize("stored", [
    "{PLAIN}secret", "{plain}secret", "{CLEARTEXT}secret", "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "{SSHA}secret", "{MD5-CRYPT}$1$x$y", "{CRYPT}secret", "secret", "",
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",    # no scheme
    "{ARGON2ID}secret", "{BLF-CRYPT}secret", "{ARGON2I}$argon2i$x",
])
def test_other_schemes_never_verify(stored):
    assert not accounts.verify_password(stored, "secret")
    assert not accounts.verify_password(stored, stored)


def test_argon2i_under_argon2id_scheme_is_refused():
    h = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1,
                              type=argon2.Type.I).hash("pw")
    assert not accounts.verify_password("{ARGON2ID}" + h, "pw")


def test_bare_argon2_or_bcrypt_without_scheme_never_verifies():
    assert not accounts.verify_password(FAST_HASHER.hash("pw"), "pw")
    assert not accounts.verify_password(bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode(), "pw")


# --------------------------------------------------------------------------- aliases

def test_parse_aliases_shapes():
    text = """\
# comment line
postmaster@Example.COM: alice@example.com
sales: alice, Bob@Example.ORG        # a bare local part applies to every local domain
team: alice,
      bob@example.com,
  # an indented comment inside a continuation
\tcarol@example.net
@example.org: catchall@example.com   # catch-all

x@example.com: y#z@example.com
"""
    al = accounts.parse_aliases(text, "aliases")
    assert al.exact["postmaster@example.com"].targets == ("alice@example.com",)
    assert al.bare["sales"].targets == ("alice", "Bob@example.org")
    assert al.bare["team"].targets == ("alice", "bob@example.com", "carol@example.net")
    assert al.bare["team"].line == 4
    assert al.catchall["example.org"].targets == ("catchall@example.com",)
    assert al.exact["x@example.com"].targets == ("y#z@example.com",)
    assert len(al) == 5


@pytest.mark.parametrize("text, problem", [
    ("  alice: bob\n", "1: continuation line (starts with white space) before any alias; remove the leading white space"),
    ("alice bob\n", "1: expected 'name: target, target, ...'"),
    (": bob\n", "1: missing alias name before ':'"),
    ("alice:\n", "1: alias 'alice' has no targets"),
    ("alice:   # nothing\n", "1: alias 'alice' has no targets"),
    ("alice: bob,\n", "1: empty target (two commas in a row, or a trailing comma at the end)"),
    ("alice: bob,, carol\n", "1: empty target (two commas in a row, or a trailing comma at the end)"),
    ("alice: bob carol\n", "1: target 'bob carol' contains white space (separate targets with commas)"),
    ("x: y\nalice: bob\n  carol\n", "2: target 'bob carol' contains white space (separate targets with commas)"),
    ("alice: |/usr/bin/prog\n", "1: target '|/usr/bin/prog': pipes, files, :include: and quoted targets are not supported; targets are addresses"),
    ("alice: /var/mail/x\n", "1: target '/var/mail/x': pipes, files, :include: and quoted targets are not supported; targets are addresses"),
    ("alice: :include:/etc/list\n", "1: target ':include:/etc/list': pipes, files, :include: and quoted targets are not supported; targets are addresses"),
    ("alice: @example.com\n", "1: target '@example.com' has no local part"),
    ("alice: bob@\n", "1: empty domain"),
    ("@: bob\n", "1: catch-all '@': empty domain"),
    ("al/ice: bob\n", "1: local part 'al/ice' contains white space, a control character or one of : , / \\ \""),
    ("sales: a\nSALES: b\n", "2: duplicate alias 'SALES' (first at line 1)"),
    ("s@example.com: a\nS@EXAMPLE.com: b\n", "2: duplicate alias 'S@EXAMPLE.com' (first at line 1)"),
    ("@example.org: a\n@Example.org: b\n", "2: duplicate alias '@Example.org' (first at line 1)"),
])
def test_malformed_aliases(text, problem):
    with pytest.raises(AccountsError) as e:
        accounts.parse_aliases(text, "/etc/mailsys/aliases")
    assert str(e.value) == f"/etc/mailsys/aliases:{problem}"


def test_alias_error_line_counts_comments():
    with pytest.raises(AccountsError) as e:
        accounts.parse_aliases("# one\n\n# three\nbad line\n", "a")
    assert str(e.value) == "a:4: expected 'name: target, target, ...'"


def test_every_bad_line_is_in_the_error():
    """The message names the first bad line and counts the others; ``problems``
    lists all of them, for ``mailsys config check``."""
    with pytest.raises(AccountsError) as e:
        accounts.parse_aliases(" lead\nok: a\nbad line\nok: b\nx:\n", "a")
    assert str(e.value) == ("a:1: continuation line (starts with white space) before any "
                            "alias; remove the leading white space (and 3 more bad lines; "
                            "`mailsys config check` lists them)")
    assert e.value.problems == (
        (1, "continuation line (starts with white space) before any alias; remove the "
            "leading white space"),
        (3, "expected 'name: target, target, ...'"),
        (4, "duplicate alias 'ok' (first at line 2)"),
        (5, "alias 'x' has no targets"))
    text = users_text("alice@example.com") + "nobody\n" + users_text("alice@example.com")
    with pytest.raises(AccountsError) as e:
        accounts.parse_users(text, "u")
    assert str(e.value).startswith("u:2: ") and str(e.value).endswith(
        " (and 1 more bad line; `mailsys config check` lists them)")
    assert [line for line, _ in e.value.problems] == [2, 3]
    assert e.value.problems[1] == (3, "duplicate account alice@example.com (first at line 1)")


# --------------------------------------------------------------------------- lookups

ALIASES = """\
postmaster: alice
sales: alice, Bob@Example.ORG
team@example.com: sales, carol
all@example.com: team@example.com, dave@example.net
loop-a@example.com: loop-b@example.com
loop-b@example.com: loop-a@example.com
self@example.com: selfish@example.com
broken@example.com: nobody
alice@example.com: alice@example.com, archive@backup.example
"""


@pytest.fixture
def acc(tmp_path):
    return make(tmp_path, users_text("Alice@example.com", "carol@example.com", "dave@example.net",
                                     "bob+list@example.com", "sales@example.net"), ALIASES)


def test_user_lookup_and_plus_addressing(acc):
    assert acc.user("alice@example.com").address == "Alice@example.com"
    assert acc.user("ALICE@EXAMPLE.COM").address == "Alice@example.com"
    assert acc.user("alice+news@example.com").address == "Alice@example.com"
    assert acc.user("alice+a+b@example.com").address == "Alice@example.com"
    assert acc.user("bob+list@example.com").address == "bob+list@example.com"
    assert acc.user("bob@example.com") is None
    assert acc.user("bob+other@example.com") is None
    assert acc.user("+x@example.com") is None
    assert acc.user("alice@example.org") is None
    assert acc.user("not-an-address") is None
    assert [u.address for u in acc.users()][:2] == ["Alice@example.com", "carol@example.com"]


def test_is_local_domain(acc):
    assert acc.is_local_domain("example.com")
    assert acc.is_local_domain("EXAMPLE.NET")
    assert not acc.is_local_domain("example.org")


def test_accepts(acc):
    assert acc.accepts("alice@example.com")
    assert acc.accepts("Alice+tag@EXAMPLE.com")
    assert acc.accepts("sales@example.com")          # bare alias
    assert acc.accepts("sales+q3@example.com")       # bare alias, plus-addressed
    assert acc.accepts("team@example.com")
    assert acc.accepts("broken@example.com")         # an alias, even if its target is bad
    assert not acc.accepts("team@example.net")       # exact alias is per domain
    assert not acc.accepts("nobody@example.com")
    assert not acc.accepts("alice@example.org")      # not a local domain
    assert not acc.accepts("garbage")


@pytest.mark.parametrize("address", ["postmaster@example.com", "PostMaster@example.net",
                                     "POSTMASTER@EXAMPLE.COM"])
def test_postmaster_always_accepted(tmp_path, address):
    assert make(tmp_path).accepts(address)
    assert not make(tmp_path).accepts("postmaster@elsewhere.org")


def test_expand_user(acc):
    assert acc.expand("carol+x@Example.COM") == Expansion(("carol@example.com",), (), ())


def test_expand_multiple_targets_bare_and_remote(acc):
    e = acc.expand("sales@example.com")
    assert e == Expansion(("Alice@example.com",), ("archive@backup.example", "Bob@example.org"), ())


def test_expand_user_wins_over_bare_alias(acc):
    # sales@example.net is an account; the bare "sales" alias only fills in where nothing
    # more specific exists.
    assert acc.expand("sales@example.net") == Expansion(("sales@example.net",), (), ())


def test_expand_nested_dedup(acc):
    e = acc.expand("all@example.com")
    assert e.local_users == ("Alice@example.com", "carol@example.com", "dave@example.net")
    assert e.remote == ("archive@backup.example", "Bob@example.org")
    assert e.errors == ()


def test_expand_self_reference_delivers_to_account(acc):
    assert acc.expand("alice@example.com") == Expansion(
        ("Alice@example.com",), ("archive@backup.example",), ())
    assert acc.expand("alice+x@example.com").local_users == ("Alice@example.com",)


def test_expand_loop(acc):
    e = acc.expand("loop-a@example.com")
    assert e.local_users == () and e.remote == ()
    assert e.errors == ("alias loop: loop-a@example.com -> loop-b@example.com -> loop-a@example.com",)


def test_expand_unknown_targets(acc):
    assert acc.expand("broken@example.com").errors == (
        "broken@example.com -> nobody@example.com: no such local user or alias",)
    assert acc.expand("self@example.com").errors == (
        "self@example.com -> selfish@example.com: no such local user or alias",)
    assert acc.expand("ghost@example.com") == Expansion(
        errors=("ghost@example.com: no such local user or alias",))


def test_expand_remote_and_invalid(acc):
    assert acc.expand("Someone@Far.Example") == Expansion((), ("Someone@far.example",), ())
    assert acc.expand("no-at-sign").errors != ()


def test_bare_alias_over_every_local_domain_and_bare_target_domain(tmp_path):
    acc = make(tmp_path, users_text("alice@example.com", "alice@example.net"),
               "postmaster: alice\n")
    assert acc.expand("postmaster@example.com").local_users == ("alice@example.com",)
    assert acc.expand("postmaster@example.net").local_users == ("alice@example.net",)


def test_bare_alias_owned_at_every_local_domain(tmp_path):
    acc = make(tmp_path, users_text("admin@example.com"), "postmaster: admin@example.com\n")
    assert acc.owned_addresses("admin@example.com") == frozenset(
        {"admin@example.com", "postmaster@example.com", "postmaster@example.net"})


def test_bare_target_in_exact_alias_uses_alias_domain(tmp_path):
    acc = make(tmp_path, users_text("alice@example.com", "alice@example.net"),
               "info@example.net: alice\n")
    assert acc.expand("info@example.net").local_users == ("alice@example.net",)


def test_catch_all(tmp_path):
    acc = make(tmp_path, users_text("alice@example.com", "catchall@example.com"),
               "@example.net: catchall@example.com\nsales: alice@example.com\n"
               "@example.com: nobody\n",
               domains=("example.com", "example.net"))
    assert acc.accepts("anything@example.net")
    assert acc.expand("anything@example.net").local_users == ("catchall@example.com",)
    # exact matches (users, aliases) come before the catch-all
    assert acc.expand("sales@example.net").local_users == ("alice@example.com",)
    assert acc.expand("alice@example.com").local_users == ("alice@example.com",)
    # a catch-all pointing at a non-existent address in its own domain is an error, not a loop
    assert acc.expand("x@example.com").errors == (
        "x@example.com -> nobody@example.com: no such local user or alias "
        "(catch-all @example.com points back at its own domain)",)


def test_catch_all_bare_target_is_catch_all_domain(tmp_path):
    acc = make(tmp_path, users_text("catchall@example.net"), "@example.net: catchall\n")
    assert acc.expand("who@example.net").local_users == ("catchall@example.net",)


def test_diamond_is_not_a_loop(tmp_path):
    acc = make(tmp_path, users_text("z@example.com"),
               "a: b, c\nb: d\nc: d\nd: z\n", domains=("example.com",))
    assert acc.expand("a@example.com") == Expansion(("z@example.com",), (), ())


def test_deep_nesting_is_cut(tmp_path):
    chain = "".join(f"n{i}: n{i + 1}\n" for i in range(40)) + "n40: z\n"
    acc = make(tmp_path, users_text("z@example.com"), chain, domains=("example.com",))
    e = acc.expand("n0@example.com")
    assert e.local_users == ()
    assert len(e.errors) == 1 and "aliases nested more than 32 deep" in e.errors[0]


def test_exponential_alias_graph_is_fast(tmp_path):
    # Each level points twice at the next: 2**30 paths, but each alias is expanded once.
    text = "".join(f"l{i}: l{i + 1}, l{i + 1}@example.com\n" for i in range(30)) + "l30: z\n"
    acc = make(tmp_path, users_text("z@example.com"), text, domains=("example.com",))
    assert acc.expand("l0@example.com").local_users == ("z@example.com",)


def test_owned_addresses(acc):
    assert acc.owned_addresses("alice@example.com") == frozenset({
        "alice@example.com",
        "postmaster@example.com",      # bare alias; at example.net it means alice@example.net
        "sales@example.com",                                  # sales@example.net is an account
        "team@example.com", "all@example.com",                # nested
    })
    assert acc.owned_addresses("carol@example.com") == frozenset(
        {"carol@example.com", "team@example.com", "all@example.com"})
    assert acc.owned_addresses("sales@example.net") == frozenset({"sales@example.net"})
    assert acc.owned_addresses("nobody@example.com") == frozenset()
    assert acc.owned_addresses("ALICE@example.COM") == acc.owned_addresses("alice@example.com")


def test_owned_addresses_exclude_catch_all(tmp_path):
    acc = make(tmp_path, users_text("alice@example.com"), "@example.net: alice@example.com\n")
    assert acc.owned_addresses("alice@example.com") == frozenset({"alice@example.com"})


def test_owns(acc):
    assert acc.owns("alice@example.com", "Sales@Example.com")
    assert acc.owns("alice@example.com", "alice+news@example.com")
    assert acc.owns("alice@example.com", "sales+x@example.com")
    assert not acc.owns("alice@example.com", "carol@example.com")
    assert not acc.owns("carol@example.com", "sales@example.com")
    assert not acc.owns("alice@example.com", "bogus")


# --------------------------------------------------------------------------- check_password

def test_check_password(tmp_path):
    h = argon("s3cret")
    acc = make(tmp_path, f"alice@example.com:{h}\nbob@example.com:{blf('bcrypt-pw')}\n")
    assert acc.check_password("alice@example.com", "s3cret")
    assert acc.check_password("ALICE@example.com", "s3cret")
    assert not acc.check_password("alice@example.com", "wrong")
    assert not acc.check_password("alice@example.com", "")
    assert acc.check_password("bob@example.com", "bcrypt-pw")
    assert not acc.check_password("bob@example.com", "s3cret")
    # login names are exact: no plus-addressing
    assert not acc.check_password("alice+x@example.com", "s3cret")


def test_check_password_unknown_user_goes_through_dummy_hash(tmp_path, monkeypatch):
    acc = make(tmp_path, users_text("alice@example.com"))
    calls = []
    real = accounts.verify_password

    def spy(stored, password):
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(accounts, "verify_password", spy)
    assert not acc.check_password("nobody@example.com", "pw")
    assert not acc.check_password("not an address", "pw")
    assert not acc.check_password("alice@example.com", "")
    assert len(calls) == 3
    assert calls[0].startswith("{ARGON2ID}$argon2id$")
    assert calls[0] == calls[1] == calls[2] == accounts._dummy_hash()   # computed once


def test_dummy_hash_uses_real_parameters_by_default(monkeypatch):
    monkeypatch.setattr(accounts, "_dummy", None)
    monkeypatch.setattr(accounts, "PASSWORD_HASHER", argon2.PasswordHasher())
    assert "$m=65536,t=3,p=4$" in accounts._dummy_hash()


def test_check_password_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    acc = make(tmp_path, f"alice@example.com:{argon('pw')}\n")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: acc.check_password("alice@example.com",
                                                             "pw" if i % 2 else "no"), range(8)))
    assert results == [False, True] * 4


# --------------------------------------------------------------------------- reload

def test_missing_files_are_empty(tmp_path):
    acc = make(tmp_path, users=None, aliases=None)
    assert acc.users() == ()
    assert not acc.accepts("alice@example.com")
    assert acc.accepts("postmaster@example.com")


def test_malformed_at_construction_raises(tmp_path):
    with pytest.raises(AccountsError, match=r"users:1: expected ADDRESS"):
        make(tmp_path, "bad\n")
    with pytest.raises(AccountsError, match=r"aliases:1: expected 'name: target"):
        make(tmp_path, "", "bad\n")


def test_refresh_picks_up_changes(tmp_path):
    clock = task.Clock()
    acc = make(tmp_path, users_text("alice@example.com"), "", clock=clock, check_interval=1.0)
    users = str(tmp_path / "users")
    accounts.write_users_atomically(users, accounts.parse_users(
        users_text("alice@example.com", "bob@example.com"), "u"))
    (tmp_path / "aliases").write_text("sales: bob\n")
    clock.advance(0.5)
    assert acc.user("bob@example.com") is None          # not yet: within the interval
    assert not acc.accepts("sales@example.com")
    clock.advance(0.6)
    assert acc.user("bob@example.com").address == "bob@example.com"
    assert acc.expand("sales@example.com").local_users == ("bob@example.com",)


def test_refresh_deleted_file_means_empty(tmp_path):
    clock = task.Clock()
    acc = make(tmp_path, users_text("alice@example.com"), clock=clock)
    os.unlink(tmp_path / "users")
    clock.advance(1)
    assert acc.user("alice@example.com") is None


def test_refresh_keeps_old_data_on_malformed_rewrite(tmp_path, logged):
    clock = task.Clock()
    acc = make(tmp_path, users_text("alice@example.com"), "sales: alice\n", clock=clock)
    (tmp_path / "users").write_text(users_text("alice@example.com") + "bob@example.com:{PLAIN}x\n")
    (tmp_path / "aliases").write_text("sales alice\n")
    clock.advance(1)
    assert acc.user("alice@example.com") is not None      # previous good data
    assert acc.user("bob@example.com") is None
    assert acc.expand("sales@example.com").local_users == ("alice@example.com",)
    errors = [e for e in logged if e.get("log_level").name == "error"]
    assert [e["problem"].split(":", 2)[1:] for e in errors] == [
        ["2", " unsupported password scheme {PLAIN}: only {ARGON2ID} and {BLF-CRYPT} are "
              "accepted; set a new password with `mailsys user passwd`"],
        ["1", " expected 'name: target, target, ...'"]]
    # logged once per bad version, not at every check
    clock.advance(1)
    acc.refresh()
    assert len([e for e in logged if e.get("log_level").name == "error"]) == 2
    # and a fixed file is picked up
    accounts.write_users_atomically(str(tmp_path / "users"), accounts.parse_users(
        users_text("bob@example.com"), "u"))
    clock.advance(1)
    assert acc.user("alice@example.com") is None
    assert acc.user("bob@example.com") is not None


def test_refresh_never_raises_on_unreadable_file(tmp_path, logged):
    clock = task.Clock()
    acc = make(tmp_path, users_text("alice@example.com"), clock=clock)
    os.unlink(tmp_path / "users")
    os.mkdir(tmp_path / "users")          # reading a directory fails with an OSError
    clock.advance(1)
    assert acc.user("alice@example.com") is not None
    assert any("cannot read" in e.get("problem", "") for e in logged)


def test_postmaster_warning(tmp_path, logged):
    make(tmp_path, users_text("alice@example.com"), "postmaster@example.com: alice\n")
    warnings = [e for e in logged if e.get("log_level").name == "warn"]
    assert [e["domain"] for e in warnings] == ["example.net"]


# --------------------------------------------------------------------------- shipped examples

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


def test_shipped_examples_parse():
    with open(os.path.join(ETC, "users")) as f:
        text = f.read()
    assert accounts.parse_users(text, "etc/users") == {}
    example = [line[2:] for line in text.splitlines() if line.startswith("# alice@")]
    assert len(example) == 1 and example[0].startswith("alice@example.com:{ARGON2ID}$argon2id$")
    with open(os.path.join(ETC, "aliases")) as f:
        aliases = accounts.parse_aliases(f.read(), "etc/aliases")
    assert aliases.bare["postmaster"].targets == ("admin@example.com",)
    assert aliases.bare["sales"].targets == ("alice", "bob@example.org", "carol@example.com")
    assert not aliases.catchall      # commented out


def test_shipped_aliases_resolve(tmp_path):
    (tmp_path / "users").write_text(users_text("admin@example.com"))
    acc = Accounts(str(tmp_path / "users"), os.path.join(ETC, "aliases"), ["example.com"])
    assert acc.expand("abuse@example.com").local_users == ("admin@example.com",)


# --------------------------------------------------------------------------- properties

from hypothesis import given, settings, strategies as st  # noqa: E402

_LOCAL = st.from_regex(r"[A-Za-z0-9!$%&'*+=?^_`{|}~-][A-Za-z0-9!#$%&'*+=?^_`{|}~-]{0,11}(\.[A-Za-z0-9_+-]{1,6}){0,2}",
                       fullmatch=True)
_DOMAIN = st.from_regex(r"[a-zA-Z0-9-]{1,10}(\.[a-zA-Z0-9-]{1,10}){0,2}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(_LOCAL, _DOMAIN, st.sampled_from([None, "maildir", "mbox"]),
                          st.one_of(st.none(), st.integers(0, 2**63))), max_size=6))
def test_round_trip_property(entries):
    users, seen = [], set()
    for local, domain, store, quota in entries:
        user = User(f"{local}@{domain.lower()}", a_hash(), store, quota)
        if user.key not in seen:
            seen.add(user.key)
            users.append(user)
    parsed = accounts.parse_users(accounts.format_users(users), "u")
    assert list(parsed.values()) == users


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab@.:,# \t\n+/|{}=-")), max_size=80))
def test_parsers_fail_only_with_accounts_error(text):
    for parse in (accounts.parse_users, accounts.parse_aliases):
        try:
            parse(text, "f")
        except AccountsError as e:
            assert str(e).startswith("f:")


@pytest.mark.parametrize("tail", [
    "::::::",                                                  # every field empty
    ":1000:1000::/home/alice::",                               # uid, gid, home
    ":1000:1000:Alice A.:/home/alice:/bin/false:userdb_mail=maildir:~/Maildir",  # extra fields
    ":::",
])
def test_a_dovecot_passwd_file_line_is_taken_as_it_is(tail):
    """CONTRACT section 3: Dovecot passwd-files can be imported.  Only the
    password is used; uid, gid, gecos, home, shell and extra fields are left
    aside (the mailbox is under [mailbox] root)."""
    bcrypt = "{BLF-CRYPT}" + BCRYPT_BODY
    users = accounts.parse_users(f"alice@example.com:{bcrypt}{tail}\n", "/etc/mailsys/users")
    assert list(users.values()) == [accounts.User("alice@example.com", bcrypt, None, None)]


def test_entries_at_a_domain_that_is_not_local_are_named_in_the_log(tmp_path, monkeypatch):
    """They are never looked at (the mail is relayed or refused first): the log
    says so at load instead of leaving "Relay access denied" to explain it."""
    events = []
    monkeypatch.setattr(accounts.log, "observer", events.append)
    make(tmp_path, users_text("alice@example.com", "p@elsewhere.example"),
         "postmaster: alice\nfoo@alias-only.example: alice@example.com\n"
         "@catch.example: alice@example.com\nbar@example.com: alice\n")
    warned = sorted(e["log_format"].format(**e) for e in events
                    if e["log_level"].name == "warn")
    up, ap = tmp_path / "users", tmp_path / "aliases"
    assert warned == sorted([
        f"{up}: account p@elsewhere.example is at elsewhere.example, which is not in [domains] "
        "local: no mail reaches it until that domain is added there",
        f"{ap}:2: alias foo@alias-only.example is at alias-only.example, which is not in "
        "[domains] local: it is never used",
        f"{ap}:3: alias @catch.example is at catch.example, which is not in [domains] local: "
        "it is never used"])
