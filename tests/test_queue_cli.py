"""``mailsys queue ...`` in-process: what is refused before asking the server
(exit 2), what the answers print, and the hint when no server answers."""
import pytest

from mailsys import cli, control


@pytest.fixture
def conf(tmp_path, monkeypatch):
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    path = tmp_path / "my mailsys.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


@pytest.fixture
def server(monkeypatch):
    """A stand-in for the control socket: ``answers[cmd]`` is the reply."""
    asked = []
    answers = {}

    def request(path, req, body=b"", timeout=120, config_file=None):
        asked.append(req)
        return answers[req["cmd"]]

    monkeypatch.setattr(control, "request", request)
    return asked, answers


def run(conf, *argv):
    return cli.main(["queue", *argv, "--config", str(conf)])


@pytest.mark.parametrize("argv, error", [
    (("show", "ALL"), "show takes one queue id, not ALL: 'mailsys queue list' shows every message"),
    (("show", "all"), "show takes one queue id, not all: 'mailsys queue list' shows every message"),
    (("show", "../etc"), "'../etc' is not a queue id: use one that 'mailsys queue list' shows"),
    (("delete", "all"), "write ALL in capitals to delete every message"),
    (("hold", ""), "hold needs a queue id, as 'mailsys queue list' shows them"),
    (("flush", "--domain", "a b"), "'a b' is not a domain name: give one such as example.com or "
                                   "@example.com (both flush it and its subdomains)"),
    (("flush", "--domain", "@"), "'@' is not a domain name: give one such as example.com or "
                                 "@example.com (both flush it and its subdomains)"),
    (("flush", "--domain", "[127.0.0.1]"), "'[127.0.0.1]' is not a domain name: give one such as "
                                           "example.com or @example.com (both flush it and its "
                                           "subdomains)"),
])
def test_bad_usage_is_refused_before_asking(conf, server, capsys, argv, error):
    asked, _ = server
    assert run(conf, *argv) == 2
    assert capsys.readouterr() == ("", f"mailsys: {error}\n")
    assert asked == []


def test_lower_case_ids_are_the_same_id(conf, server, capsys):
    asked, answers = server
    answers["delete"] = {"ok": True, "ids": ["1A2B3C"]}
    assert run(conf, "delete", "1a2b3c") == 0
    assert asked == [{"cmd": "delete", "id": "1A2B3C"}]
    assert capsys.readouterr().out == "1A2B3C: deleted\n"


def test_flush_domain_takes_d_and_at_d_as_etrn(conf, server, capsys):
    asked, answers = server
    answers["flush"] = {"ok": True, "count": 1}
    assert run(conf, "flush", "--domain", "@Down.test") == 0
    assert run(conf, "flush", "--domain", "down.test") == 0
    assert asked == [{"cmd": "flush", "domain": "down.test"}] * 2
    assert capsys.readouterr().out == "1 message scheduled for delivery now (domain down.test)\n" * 2


def test_hold_of_a_held_message_and_release_of_one_not_held_succeed(conf, server, capsys):
    _, answers = server
    answers["hold"] = {"ok": True, "ids": [], "unchanged": ["1A2B"]}
    answers["release"] = {"ok": True, "ids": [], "unchanged": ["1A2B"]}
    assert run(conf, "hold", "1A2B") == 0
    assert run(conf, "release", "1A2B") == 0
    assert capsys.readouterr() == ("message 1A2B is already on hold\nmessage 1A2B is not on hold\n", "")


def test_not_running_hint_names_the_config_file(conf, capsys, monkeypatch):
    sock = conf.parent / "state" / "control.sock"
    assert run(conf, "list") == 1
    assert capsys.readouterr().err == (
        f"mailsys: mailsys is not running (nothing answers on {sock}: No such file or "
        f"directory); start it with: twistd -n mailsys --config '{conf}'\n")
    monkeypatch.setenv("MAILSYS_CONFIG", str(conf))
    assert cli.main(["queue", "list"]) == 1
    assert capsys.readouterr().err.endswith(f"; start it with: twistd -n mailsys --config '{conf}'\n")


def test_not_running_hint_for_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["queue", "list"]) == 1
    assert capsys.readouterr().err.endswith("); start it with: twistd -n mailsys\n")
