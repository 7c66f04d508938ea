"""``twistd -n mailsys --config ...`` on setups it cannot serve: one sentence per
problem through twistd's usage-error path (status 1), never a Python traceback,
and the same lines ``mailsys config check`` prints (with status 2)."""
import subprocess

import pytest

from tests.integration.harness import TWISTD, MailsysServer, child_env

pytestmark = pytest.mark.integration


def prepare(server, case):
    base = server.base
    if case == "aliases":
        server.aliases_path.write_text("no colon here\n")
    elif case == "users":
        server.users_path.write_text("p1@example.com:{PLAIN}x\n")
    elif case == "garbage certificate":
        (base / "tls").mkdir()
        (base / "tls" / "fullchain.pem").write_text("garbage\n")
        (base / "tls" / "privkey.pem").write_text("garbage\n")


CASES = {
    "aliases": ({}, "{base}/aliases:1: accounts.aliases: expected 'name: target, target, "
                    "...'; fix that line"),
    "users": ({}, "{base}/users:1: accounts.users: unsupported password scheme {{PLAIN}}: only "
                  "{{ARGON2ID}} and {{BLF-CRYPT}} are accepted; set a new password with "
                  "`mailsys user passwd`"),
    "no certificate": ({"listen": {"submissions": ["tcp:0:interface=127.0.0.1"]}},
                       "{base}/mailsys.toml:{line}: listen.submissions: implicit TLS needs a "
                       "certificate and key, but {base}/tls/fullchain.pem and "
                       "{base}/tls/privkey.pem do not exist; run 'mailsys tls self-signed', "
                       "point [tls] at your certificate, or set submissions = []"),
    "garbage certificate": ({"listen": {"pop3s": ["tcp:0:interface=127.0.0.1"]}},
                            "{base}/mailsys.toml:{line}: tls.certificate: "
                            "{base}/tls/fullchain.pem holds no PEM certificate; run 'mailsys "
                            "tls self-signed --force' or point [tls] at a matching certificate "
                            "and key"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_twistd_refuses_in_one_sentence_like_config_check(tmp_path, case):
    overrides, expected = CASES[case]
    server = MailsysServer(tmp_path / "m", overrides)
    prepare(server, case)
    text = server.config_path.read_text().splitlines()
    key = {"no certificate": "submissions = ", "garbage certificate": "certificate = "}.get(case)
    line = next((n for n, t in enumerate(text, 1) if key and t.startswith(key)), 0)
    expected = expected.format(base=server.base, line=line)

    check = server.mailsys_cli("config", "check")
    assert (check.returncode, check.stdout, check.stderr) == (2, "", expected + "\n")

    done = subprocess.run(TWISTD + ["-n", "--pidfile=", f"--logfile={server.log_path}",
                                    "mailsys", "--config", str(server.config_path)],
                          cwd=server.base, env=child_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.endswith(f": configuration problems:\n{expected}\n")
    assert not server.state_dir.exists()   # refused before anything was made


def test_twistd_on_a_port_in_use_stops_in_one_sentence(tmp_path):
    """Decided only at bind time (config check cannot know), and still one
    sentence with status 1, not twistd's traceback."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        server = MailsysServer(tmp_path / "m", {"listen": {"mta": [f"tcp:{port}:interface=127.0.0.1"]}})
        done = subprocess.run(TWISTD + ["-n", "--pidfile=", f"--logfile={server.log_path}",
                                        "mailsys", "--config", str(server.config_path)],
                              cwd=server.base, env=child_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    log = server.log_path.read_text()
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr + log
    assert log.endswith(f"mailsys: cannot start: listen.mta tcp:{port}:interface=127.0.0.1: "
                        f"cannot listen on 127.0.0.1:{port}: Address already in use; stop what "
                        f"uses it or change listen.mta\n"), log[-2000:]
