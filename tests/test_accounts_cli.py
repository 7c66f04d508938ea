"""``mailsys user add|passwd|del|list`` in-process, and once through ``python -m mailsys``."""
import io
import os
import stat
import subprocess
import sys

import argon2
import pytest

from mailsys import accounts, accounts_cli, cli

FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch):
    monkeypatch.setattr(accounts, "PASSWORD_HASHER", FAST_HASHER)


@pytest.fixture
def conf(tmp_path, monkeypatch):
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    path = tmp_path / "mailsys.toml"
    path.write_text(f"""\
[server]
state_dir = "{tmp_path / 'state'}"

[domains]
local = ["example.com", "example.net"]

[accounts]
users = "etc/users"
aliases = "etc/aliases"

[mailbox]
default_store = "maildir"
quota = 1000
""")
    return path


@pytest.fixture
def users_file(conf):
    return conf.parent / "etc" / "users"


def run(conf, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli.main(["user", *argv, "--config", str(conf)])


def add(conf, monkeypatch, address, password="s3cret pw", *extra):
    return run(conf, "add", address, "--password-stdin", *extra,
               stdin=password + "\n", monkeypatch=monkeypatch)


def test_add_creates_file_and_directory(conf, users_file, monkeypatch, capsys):
    assert add(conf, monkeypatch, "Alice@Example.COM", "s3cret pw", "--store", "mbox",
               "--quota", "104857600") == 0
    assert capsys.readouterr().out == "added Alice@example.com\n"
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(users_file.parent).st_mode) == 0o700
    assert sorted(os.listdir(users_file.parent)) == ["users"]
    text = users_file.read_text()
    assert "s3cret" not in text
    (user,) = accounts.parse_users(text, "u").values()
    assert user.address == "Alice@example.com"
    assert (user.store, user.quota) == ("mbox", 104857600)
    assert accounts.verify_password(user.password_hash, "s3cret pw")
    assert text.startswith("#")    # a new file explains itself


def test_added_account_is_seen_by_a_running_server(conf, users_file, monkeypatch):
    from twisted.internet import task
    clock = task.Clock()
    acc = accounts.Accounts(str(users_file), str(users_file.parent / "aliases"),
                            ["example.com"], clock=clock)
    assert not acc.accepts("alice@example.com")
    assert add(conf, monkeypatch, "alice@example.com", "pw one") == 0
    clock.advance(1)
    assert acc.accepts("alice@example.com")
    assert acc.check_password("alice@example.com", "pw one")
    run(conf, "passwd", "alice@example.com", "--password-stdin", stdin="pw two\n",
        monkeypatch=monkeypatch)
    clock.advance(1)
    assert not acc.check_password("alice@example.com", "pw one")
    assert acc.check_password("alice@example.com", "pw two")
    run(conf, "del", "alice@example.com")
    clock.advance(1)
    assert acc.user("alice@example.com") is None


def test_add_password_stdin_strips_only_the_newline(conf, users_file, monkeypatch):
    assert run(conf, "add", "a@example.com", "--password-stdin",
               stdin="  spaced pw \r\nsecond line\n", monkeypatch=monkeypatch) == 0
    (user,) = accounts.read_users(str(users_file)).values()
    assert accounts.verify_password(user.password_hash, "  spaced pw ")


def test_add_duplicate_fails_with_status_1(conf, users_file, monkeypatch, capsys):
    assert add(conf, monkeypatch, "alice@example.com") == 0
    before = users_file.read_text()
    capsys.readouterr()
    assert add(conf, monkeypatch, "ALICE@example.com") == 1
    err = capsys.readouterr().err
    assert err == ("mailsys: alice@example.com already exists; change its password with "
                   "`mailsys user passwd` or remove it with `mailsys user del`\n")
    assert users_file.read_text() == before


def test_add_at_non_local_domain_is_usage_error(conf, users_file, monkeypatch, capsys):
    assert add(conf, monkeypatch, "bob@example.org") == 2
    err = capsys.readouterr().err
    assert err == (f"mailsys: example.org is not a local domain (domains.local: example.com, "
                   f"example.net); add it to domains.local in {conf} or use an address at a "
                   "local domain\n")
    assert not users_file.exists()


@pytest.mark.parametrize("address", ["bob", "bob@", "@example.com", "../x@example.com",
                                     "#bob@example.com"])
def test_add_invalid_address_is_usage_error(conf, monkeypatch, capsys, address):
    assert add(conf, monkeypatch, address) == 2
    assert "give the address as local@domain" in capsys.readouterr().err


def test_add_empty_password_refused(conf, users_file, monkeypatch, capsys):
    assert run(conf, "add", "a@example.com", "--password-stdin", stdin="\n",
               monkeypatch=monkeypatch) == 1
    assert run(conf, "add", "a@example.com", "--password-stdin", stdin="",
               monkeypatch=monkeypatch) == 1
    assert capsys.readouterr().err == (
        "mailsys: an empty password is refused; give a non-empty password\n" * 2)
    assert not users_file.exists()


def test_add_prompts_twice(conf, users_file, monkeypatch):
    answers = iter(["typed pw", "typed pw"])
    prompts = []
    monkeypatch.setattr(accounts_cli.getpass, "getpass",
                        lambda prompt: prompts.append(prompt) or next(answers))
    assert run(conf, "add", "a@example.com") == 0
    assert prompts == ["Password: ", "Password (again): "]
    (user,) = accounts.read_users(str(users_file)).values()
    assert accounts.verify_password(user.password_hash, "typed pw")


def test_add_prompt_mismatch_fails(conf, users_file, monkeypatch, capsys):
    answers = iter(["one secret", "another secret"])
    monkeypatch.setattr(accounts_cli.getpass, "getpass", lambda prompt: next(answers))
    assert run(conf, "add", "a@example.com") == 1
    err = capsys.readouterr().err
    assert err == ("mailsys: the two passwords do not match; run the command again and type "
                   "the same password twice\n")
    assert "secret" not in err
    assert not users_file.exists()


@pytest.mark.parametrize("argv", [["--password", "hunter2-xyz"], ["--password=hunter2-xyz"],
                                  ["--password"]])
@pytest.mark.parametrize("command", ["add", "passwd"])
def test_no_password_option_exists(conf, users_file, capsys, command, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["user", command, "a@example.com", *argv, "--config", str(conf)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "there is no --password option" in err and "--password-stdin" in err
    assert not users_file.exists()


@pytest.mark.parametrize("bad", [["--quota", "-1"], ["--quota", "1k"], ["--store", "imap"]])
def test_add_bad_options_are_usage_errors(conf, monkeypatch, bad):
    with pytest.raises(SystemExit) as e:
        add(conf, monkeypatch, "a@example.com", "pw", *bad)
    assert e.value.code == 2


def test_passwd(conf, users_file, monkeypatch, capsys):
    add(conf, monkeypatch, "alice@example.com", "old pw", "--store", "mbox")
    users_file.write_text("# kept comment\n" + users_file.read_text())
    assert run(conf, "passwd", "ALICE@example.com", "--password-stdin", stdin="new pw\n",
               monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "changed the password of alice@example.com"
    text = users_file.read_text()
    assert text.startswith("# kept comment\n")
    (user,) = accounts.parse_users(text, "u").values()
    assert user.address == "alice@example.com" and user.store == "mbox"
    assert accounts.verify_password(user.password_hash, "new pw")
    assert not accounts.verify_password(user.password_hash, "old pw")
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600


def test_passwd_unknown_user(conf, monkeypatch, capsys):
    add(conf, monkeypatch, "alice@example.com")
    capsys.readouterr()
    assert run(conf, "passwd", "bob@example.com", "--password-stdin", stdin="pw\n",
               monkeypatch=monkeypatch) == 1
    assert capsys.readouterr().err == (
        "mailsys: there is no account bob@example.com; check the spelling with "
        "`mailsys user list`, or add it with `mailsys user add`\n")


def test_del(conf, users_file, monkeypatch, capsys):
    add(conf, monkeypatch, "alice@example.com")
    add(conf, monkeypatch, "bob@example.com")
    (users_file.parent / "aliases").write_text("sales: bob, alice\nother: carol\n")
    capsys.readouterr()
    assert run(conf, "del", "Bob@example.com") == 0
    out, err = capsys.readouterr()
    assert out == "removed bob@example.com (its mailbox, if any, is kept)\n"
    assert err == (f"mailsys: note: {users_file.parent / 'aliases'} still names "
                   "bob@example.com in sales; edit those aliases\n")
    assert list(accounts.read_users(str(users_file))) == ["alice@example.com"]
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert run(conf, "del", "bob@example.com") == 1
    assert "there is no account bob@example.com" in capsys.readouterr().err


def test_del_without_users_file(conf, capsys):
    assert run(conf, "del", "bob@example.com") == 1
    assert "there is no account bob@example.com" in capsys.readouterr().err


def test_list(conf, monkeypatch, capsys):
    assert run(conf, "list") == 0
    assert capsys.readouterr().out == ""
    add(conf, monkeypatch, "zed@example.com")
    add(conf, monkeypatch, "Alice@example.net", "pw", "--store", "mbox", "--quota", "0")
    add(conf, monkeypatch, "bob@example.com", "pw", "--quota", "5000")
    capsys.readouterr()
    assert run(conf, "list") == 0
    assert capsys.readouterr().out == (
        "bob@example.com store=maildir(default) quota=5000\n"
        "zed@example.com store=maildir(default) quota=1000(default)\n"
        "Alice@example.net store=mbox quota=0\n")


def test_malformed_users_file_is_reported(conf, users_file, monkeypatch, capsys):
    users_file.parent.mkdir()
    users_file.write_text("alice@example.com:{PLAIN}secret\n")
    assert run(conf, "list") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mailsys: {users_file}:1: unsupported password scheme {{PLAIN}}")
    assert "secret" not in err.replace("{PLAIN}", "")
    assert add(conf, monkeypatch, "bob@example.com") == 2
    assert users_file.read_text() == "alice@example.com:{PLAIN}secret\n"


def test_config_option_anywhere_and_env(conf, users_file, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert cli.main(["--config", str(conf), "user", "add", "a@example.com",
                     "--password-stdin"]) == 0
    monkeypatch.setenv("MAILSYS_CONFIG", str(conf))
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert cli.main(["user", "add", "b@example.com", "--password-stdin"]) == 0
    assert list(accounts.read_users(str(users_file))) == ["a@example.com", "b@example.com"]


def test_password_never_in_output(conf, monkeypatch, capsys):
    password = "Tr0ub4dor&3-unique"
    add(conf, monkeypatch, "a@example.com", password)
    run(conf, "passwd", "a@example.com", "--password-stdin", stdin=password + "\n",
        monkeypatch=monkeypatch)
    add(conf, monkeypatch, "a@example.com", password)
    add(conf, monkeypatch, "a@example.org", password)
    run(conf, "list")
    out, err = capsys.readouterr()
    assert password not in out + err


def test_console_script_subprocess(conf, users_file):
    password = "subprocess-Pa55word"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MAILSYS_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mailsys", "user", "add", "carol@example.com",
         "--password-stdin", "--config", str(conf)],
        input=password + "\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "added carol@example.com\n"
    assert password not in proc.stdout
    raw = users_file.read_bytes()
    assert password.encode() not in raw
    (user,) = accounts.parse_users(raw.decode(), "u").values()
    assert "$argon2id$v=19$m=65536,t=3,p=4$" in user.password_hash   # real parameters
    assert accounts.verify_password(user.password_hash, password)
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
