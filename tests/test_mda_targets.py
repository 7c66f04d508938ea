"""MDA.targets remembers each recipient's expansion, account and checked mailbox
path for as long as the accounts files stay the same, and notices every change
(real mailsys.accounts.Accounts on files; the change is seen at the next lookup)."""
import os
from types import SimpleNamespace

from mailsys import accounts as accounts_mod
from mailsys.accounts import Accounts
from mailsys.mda import lmtp as mda_lmtp
from mailsys.mda.lmtp import MDA
from mailsys.mda.memory import MemoryStore
from tests.test_accounts import a_hash


def write(path, text, stamp):
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))     # a new mtime even within one clock tick


def make(tmp_path):
    users, aliases = tmp_path / "users", tmp_path / "aliases"
    write(users, f"joe@example.com:{a_hash()}\n", 10**18)
    write(aliases, "team@example.com: joe@example.com\n", 10**18)
    accounts = Accounts(users, aliases, ["example.com"], check_interval=0)
    config = SimpleNamespace(
        mailbox=SimpleNamespace(root=str(tmp_path / "mail"), default_store="maildir", quota=0),
        domains=SimpleNamespace(local=("example.com",)))
    mda = MDA(config, accounts, reactor=None, stores={"maildir": MemoryStore(), "mbox": MemoryStore()})
    return mda, users, aliases


def test_a_repeated_recipient_is_not_worked_out_again(tmp_path, monkeypatch):
    mda, _, _ = make(tmp_path)
    calls = []
    real = mda_lmtp.mailbox_location
    monkeypatch.setattr(mda_lmtp, "mailbox_location", lambda *a: calls.append(a) or real(*a))
    first = mda.targets("joe@example.com")
    assert first == ((("joe@example.com", "maildir", 0,
                       str(tmp_path / "mail" / "example.com" / "joe" / "Maildir")),), (), ())
    assert mda.targets("joe@example.com") is first
    assert len(calls) == 1
    assert mda.targets("team@example.com") == first     # another address: worked out once
    assert len(calls) == 2
    assert mda.targets("nobody@example.com").code == 550
    assert mda.targets("nobody@example.com").code == 550


def test_every_change_to_either_file_is_seen_at_the_next_lookup(tmp_path, monkeypatch):
    mda, users, aliases = make(tmp_path)
    stats = []
    real_stat = accounts_mod.os.stat
    monkeypatch.setattr(accounts_mod.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    assert mda.targets("joe@example.com")[0][0][2] == 0
    assert len(stats) >= 2                        # both files checked on this lookup...
    stats.clear()
    mda.targets("joe@example.com")
    assert sorted(map(str, stats)) == sorted([str(users), str(aliases)])    # ...and on a remembered one

    write(users, f"joe@example.com:{a_hash()}:store=mbox,quota=5000\n", 2 * 10**18)
    store, quota, location = mda.targets("joe@example.com")[0][0][1:]
    assert (store, quota) == ("mbox", 5000) and location.endswith("/joe/mbox")

    assert mda.targets("ann@example.com").code == 550
    write(users, f"joe@example.com:{a_hash()}\nann@example.com:{a_hash()}\n", 3 * 10**18)
    assert mda.targets("ann@example.com")[0][0][0] == "ann@example.com"

    write(aliases, "team@example.com: ann@example.com, friend@example.org\n", 4 * 10**18)
    mda.spool = object()       # remote alias targets are kept only when there is a spool
    local, remote, _ = mda.targets("team@example.com")
    assert [t[0] for t in local] == ["ann@example.com"] and remote == ("friend@example.org",)

    os.remove(users)
    assert mda.targets("joe@example.com").code == 550


def test_the_memo_is_bounded(tmp_path, monkeypatch):
    mda, _, _ = make(tmp_path)
    monkeypatch.setattr(mda_lmtp, "TARGETS_MEMO", 3)
    for i in range(10):
        mda.targets(f"joe+{i}@example.com")
    assert len(mda._memo) == 3


def test_an_alias_target_that_is_nobody_goes_to_the_queue_and_is_reported(tmp_path):
    """A typo in the aliases file loses nothing: the members that exist get
    their copies, the one that is nobody is handed to the queue (whose attempt
    bounces it to the sender, with the alias as ORCPT), and the problem comes
    back for the log.  Before, the unknown member was dropped without a word."""
    mda, _, aliases = make(tmp_path)
    mda.spool = object()        # any spool: targets() only asks whether there is one
    write(aliases, "partial@example.com: joe, ghost\n", 2 * 10**18)
    local, queued, problems = mda.targets("partial@example.com")
    assert [t[0] for t in local] == ["joe@example.com"]
    assert queued == ("ghost@example.com",)
    assert problems == ("partial@example.com -> ghost@example.com: no such local user or alias",)
    # Without a spool (an MDA that cannot queue) the copy is not made, the log still says why.
    mda.spool = None
    mda._seen = None
    assert mda.targets("partial@example.com")[1:] == ((), problems)


def test_an_alias_that_reaches_nobody_is_refused_with_its_reason(tmp_path):
    mda, _, aliases = make(tmp_path)
    write(aliases, "ghostonly@example.com: ghost\n"
                   "loop1@example.com: loop2@example.com\n"
                   "loop2@example.com: loop1@example.com\n", 2 * 10**18)
    refused = mda.targets("ghostonly@example.com")
    assert (refused.code, refused.status, refused.text) == (
        550, "5.1.1", "User unknown in local recipient table: "
                      "ghostonly@example.com -> ghost@example.com: no such local user or alias")
    refused = mda.targets("loop1@example.com")
    assert (refused.code, refused.status, refused.text) == (
        554, "5.4.6", "Alias loop: loop1@example.com -> loop2@example.com -> loop1@example.com")
    refused = mda.targets("nobody@example.com")      # not an alias: the plain reply
    assert (refused.code, refused.status, refused.text) == (
        550, "5.1.1", "User unknown in local recipient table")
