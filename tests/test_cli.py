"""mailsys.cli and twistd's start-up: refusals are one sentence, never a traceback."""
import os
import subprocess
import sys

import pytest
from twisted.python import usage

from mailsys import tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_closed_stdout(python_args, cwd):
    """``python3 PYTHON_ARGS | head -0``: stdout is a pipe whose reader is gone."""
    read, write = os.pipe()
    os.close(read)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MAILSYS_CONFIG", None)
    try:
        return subprocess.run([sys.executable, *python_args], stdout=write,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd,
                              env=env, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("argv", [["config", "check"], ["user", "list"]])
def test_closed_stdout_stops_quietly_with_status_1(tmp_path, argv):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "users").write_text(
        "a@localhost:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n")
    done = run_with_closed_stdout(["-m", "mailsys.cli", *argv], tmp_path)
    assert (done.returncode, done.stderr) == (1, b"")


QUEUE_LIST = """
import sys
from mailsys import cli, queue_cli
message = {"id": "Q1", "size": 10, "arrival": 0, "sender": "a@example.com",
           "state": "deferred", "recipients": [{"state": "deferred", "address": "b@example.org",
                                                "error": "451 try later"}]}
# The answer of a running server, without one.
queue_cli._ask = lambda config, request: {"ok": True, "messages": [message] * 1000}
sys.exit(cli.main(["queue", "list"]))
"""


def test_queue_list_with_closed_stdout(tmp_path):
    done = run_with_closed_stdout(["-c", QUEUE_LIST], tmp_path)
    assert (done.returncode, done.stderr) == (1, b"")


# --- twistd -n mailsys ---------------------------------------------------------------

def test_twistd_options_refuse_what_config_check_refuses(tmp_path):
    (tmp_path / "aliases").write_text("no colon here\n")
    config = tmp_path / "mailsys.toml"
    config.write_text(f'[accounts]\nusers = "{tmp_path}/users"\naliases = "{tmp_path}/aliases"\n'
                      '[listen]\nsubmissions = []\npop3s = []\n')
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(config)])
    assert str(info.value) == ("configuration problems:\n"
                               f"{tmp_path}/aliases:1: accounts.aliases: expected 'name: target, "
                               "target, ...'; fix that line")


def test_twistd_options_missing_file(tmp_path):
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(tmp_path / "nope.toml")])
    assert str(info.value) == (f"cannot read the configuration file {tmp_path}/nope.toml: No such "
                               "file or directory; check --config or $MAILSYS_CONFIG")


def test_make_service_turns_late_problems_into_one_sentence(tmp_path, monkeypatch):
    """A file broken between option parsing and makeService: twistd prints a
    UsageError raised there as a traceback, so makeService exits instead."""
    from mailsys.accounts import AccountsError

    def broken(*args, **kwargs):
        raise AccountsError(f"{tmp_path}/users:1: unsupported password scheme {{PLAIN}}")

    monkeypatch.setattr(tap, "build", broken)
    options = type("O", (), {"config": None, "path": None})()
    with pytest.raises(SystemExit) as info:
        tap.makeService(options)
    assert info.value.code == (f"mailsys: cannot start: {tmp_path}/users:1: unsupported password "
                               "scheme {PLAIN}")
