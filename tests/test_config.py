"""mailsys.config: the TOML file of CONTRACT section 2 and `mailsys config check`."""
import argparse
import dataclasses
import ipaddress
import os
import re
import socket

import pytest

from mailsys import config as cfg
from mailsys.config import ConfigError, embedded_default, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "mailsys.toml")


def write(tmp_path, text, name="mailsys.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(path):
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- defaults ----------------------------------------------------------------------

def test_empty_file_gives_the_contract_defaults(tmp_path):
    c = load(write(tmp_path, ""))
    assert c.source == str(tmp_path / "mailsys.toml")
    assert c.server == cfg.ServerConfig(hostname=cfg.machine_hostname(), state_dir="/var/lib/mailsys",
                                        workers=0)
    assert c.listen == cfg.ListenConfig(
        mta=("tcp:25",), submission=("tcp:587",), submissions=("tcp:465",),
        lmtp=("unix:/var/lib/mailsys/lmtp.sock",), pop3=("tcp:110",), pop3s=("tcp:995",))
    assert c.tls == cfg.TLSConfig(certificate="/etc/mailsys/tls/fullchain.pem",
                                  key="/etc/mailsys/tls/privkey.pem")
    assert c.domains == cfg.DomainsConfig(local=("example.com",), relay=())
    assert c.accounts == cfg.AccountsConfig(users="/etc/mailsys/users", aliases="/etc/mailsys/aliases")
    assert c.mailbox == cfg.MailboxConfig(root="/var/mail/vhosts", default_store="maildir", quota=0)
    assert c.relay == cfg.RelayConfig(
        mynetworks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        smarthost="", smarthost_auth="", outbound_tls="may", transport=())
    assert c.queue == cfg.QueueConfig(retry_min=300, retry_max=3600, lifetime=432000, warn_after=14400)
    assert c.limits == cfg.LimitsConfig(
        message_size=26214400, recipients=1000, connections=1000, connections_per_ip=50,
        command_timeout=300, data_timeout=600, auth_failures=3)
    assert c.dns == cfg.DNSConfig(nameservers=(), timeout=5)


def test_config_is_frozen_and_uses_tuples(tmp_path):
    c = load(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits.message_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server = None
    for section in dataclasses.fields(c)[1:]:
        for f in dataclasses.fields(getattr(c, section.name)):
            assert not isinstance(getattr(getattr(c, section.name), f.name), (list, dict, set))
    hash(c)  # frozen all the way down


def test_full_file_values(tmp_path):
    c = load(write(tmp_path, """
[server]
hostname = "Mail.Example.org."
state_dir = "/srv/mailsys"
[listen]
mta = ["tcp:25", "tcp6:25:interface=\\\\:\\\\:1"]
submission = []
[domains]
local = ["Example.ORG.", "bücher.example"]
relay = ["backup.example.net"]
[relay]
mynetworks = ["10.1.2.3/8", "192.0.2.7", "2001:db8::/32"]
smarthost = "[smtp.example.net]:587"
outbound_tls = "encrypt"
transport = { "z.example.com" = "smtp:[10.0.0.5]:25", "A.example.com" = "lmtp:[10.0.0.6]:24" }
[dns]
nameservers = ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "2001:db8::54"]
"""))
    assert c.server.hostname == "Mail.Example.org"
    assert load(write(tmp_path, '[server]\nhostname = "mail.bücher.example"\n', "idn.toml")
                ).server.hostname == "mail.xn--bcher-kva.example"
    assert c.listen.mta == ("tcp:25", "tcp6:25:interface=\\:\\:1")
    assert c.listen.submission == ()
    assert c.domains.local == ("example.org", "xn--bcher-kva.example")
    assert c.domains.relay == ("backup.example.net",)
    assert c.relay.mynetworks == (ipaddress.ip_network("10.0.0.0/8"),
                                  ipaddress.ip_network("192.0.2.7/32"),
                                  ipaddress.ip_network("2001:db8::/32"))
    assert c.relay.smarthost == "[smtp.example.net]:587"
    assert c.relay.transport == (("a.example.com", "lmtp:[10.0.0.6]:24"),
                                 ("z.example.com", "smtp:[10.0.0.5]:25"))
    assert c.dns.nameservers == ("192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "2001:db8::54")


def test_transport_as_its_own_table(tmp_path):
    c = load(write(tmp_path, '[relay.transport]\n"corp.example.com" = "smtp:relay.corp.example.com"\n'))
    assert c.relay.transport == (("corp.example.com", "smtp:relay.corp.example.com"),)


# --- the embedded default ----------------------------------------------------------

def test_embedded_default(tmp_path):
    base = str(tmp_path)
    c = embedded_default(base)
    assert c.source == "<embedded default>"
    assert c.server.state_dir == f"{base}/var"
    assert c.listen == cfg.ListenConfig(
        mta=("tcp:2525:interface=127.0.0.1",), submission=("tcp:2587:interface=127.0.0.1",),
        submissions=("tcp:2465:interface=127.0.0.1",), lmtp=(f"unix:{base}/var/lmtp.sock",),
        pop3=("tcp:2110:interface=127.0.0.1",), pop3s=("tcp:2995:interface=127.0.0.1",))
    assert c.tls == cfg.TLSConfig(certificate=f"{base}/var/tls/fullchain.pem",
                                  key=f"{base}/var/tls/privkey.pem")
    assert c.domains == cfg.DomainsConfig(local=("localhost",), relay=())
    assert c.accounts == cfg.AccountsConfig(users=f"{base}/var/users", aliases=f"{base}/var/aliases")
    assert c.mailbox.root == f"{base}/var/mail"
    defaults = load(write(tmp_path, ""))
    for same in ("relay", "queue", "limits", "dns"):
        assert getattr(c, same) == getattr(defaults, same)
    assert c.mailbox.default_store == "maildir" and c.mailbox.quota == 0


def test_embedded_default_escapes_colons_in_the_socket_path(tmp_path):
    base = tmp_path / "odd:dir"
    base.mkdir()
    assert embedded_default(str(base)).listen.lmtp == (f"unix:{tmp_path}/odd\\:dir/var/lmtp.sock",)


def test_documented_embedded_default_is_the_real_one():
    with open(os.path.join(ROOT, "docs", "configuration.rst")) as f:
        docs = f.read()
    block = docs.split(".. code-block:: toml\n\n", 1)[1].split("\nFor programmers", 1)[0]
    text = "\n".join(line[4:] for line in block.splitlines()).strip() + "\n"
    assert text == cfg._EMBEDDED_TOML


def test_load_none_is_the_embedded_default_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(None) == embedded_default(str(tmp_path))


# --- relative paths ----------------------------------------------------------------

def test_relative_paths_start_at_the_config_directory(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    c = load(write(sub, """
[server]
state_dir = "../state"
[listen]
lmtp = ["unix:run/lmtp.sock:mode=660", "unix:address=other.sock"]
mta = ["unix:/abs/mta.sock"]
[tls]
certificate = "tls/cert.pem"
[accounts]
users = "users"
aliases = "/etc/aliases"
[relay]
smarthost_auth = "auth"
transport = { "x.example" = "lmtp:unix:x.sock" }
"""))
    assert c.server.state_dir == f"{tmp_path}/state"
    assert c.listen.lmtp == (f"unix:{sub}/run/lmtp.sock:mode=660", f"unix:address={sub}/other.sock")
    assert c.listen.mta == ("unix:/abs/mta.sock",)
    assert c.tls.certificate == f"{sub}/tls/cert.pem"
    assert c.accounts.users == f"{sub}/users"
    assert c.accounts.aliases == "/etc/aliases"
    assert c.relay.smarthost_auth == f"{sub}/auth"
    assert c.relay.transport == (("x.example", f"lmtp:unix:{sub}/x.sock"),)


def test_relative_config_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[accounts]\nusers = "u"\n')
    c = load("mailsys.toml")
    assert c.source == f"{tmp_path}/mailsys.toml"
    assert c.accounts.users == f"{tmp_path}/u"


# --- problems, each with file, line and key ----------------------------------------

def test_unknown_key(tmp_path):
    path = write(tmp_path, '[server]\nstate_dir = "/x"\nhostnme = "mail.example.com"\n')
    assert problems(path) == [f"{path}:3: server.hostnme: unknown key; did you mean 'hostname'?"]


def test_unknown_section(tmp_path):
    path = write(tmp_path, '[server]\n\n[limit]\nmessage_size = 5\n')
    assert problems(path) == [f"{path}:3: limit: unknown section; did you mean 'limits'?"]
    path = write(tmp_path, '[frobnicate]\n')
    assert problems(path) == [f"{path}:1: frobnicate: unknown section; known: server, listen, "
                              "tls, domains, accounts, mailbox, relay, queue, limits, dns"]


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, 'limits = 5\n')
    assert problems(path) == [f"{path}:1: limits: must be a table ([limits]), got 5"]


def test_wrong_types(tmp_path):
    path = write(tmp_path, """[limits]
message_size = "big"
recipients = true
data_timeout = 1.5
[listen]
mta = 25
pop3 = ["tcp:110", 7]
[server]
state_dir = 3
""")
    assert problems(path) == [
        f"{path}:2: limits.message_size: must be an integer, got 'big'",
        f"{path}:3: limits.recipients: must be an integer, got true",
        f"{path}:4: limits.data_timeout: must be an integer, got 1.5",
        f"{path}:6: listen.mta: must be a list of endpoint strings, got 25",
        f"{path}:7: listen.pop3: must be a list of endpoint strings, got 7 in the list",
        f"{path}:9: server.state_dir: must be a string, got 3",
    ]


def test_ranges(tmp_path):
    path = write(tmp_path, """[limits]
recipients = 0
[mailbox]
quota = -1
[queue]
retry_min = 0
warn_after = 0
[dns]
timeout = 0
""")
    assert problems(path) == [
        f"{path}:2: limits.recipients: must be at least 1, got 0",
        f"{path}:4: mailbox.quota: must be at least 0, got -1",
        f"{path}:6: queue.retry_min: must be at least 1, got 0",
        f"{path}:9: dns.timeout: must be at least 1, got 0",
    ]


def test_retry_max_below_retry_min(tmp_path):
    path = write(tmp_path, "[queue]\nretry_min = 500\nretry_max = 100\n")
    assert problems(path) == [f"{path}:3: queue.retry_max: retry_max (100) must be at least retry_min (500)"]
    # only retry_min written: the line to edit is that one
    path = write(tmp_path, "[queue]\nretry_min = 5000\n")
    assert problems(path) == [f"{path}:2: queue.retry_min: retry_max (3600) must be at least retry_min (5000)"]


def test_bad_endpoint(tmp_path):
    path = write(tmp_path, '[listen]\n\nmta = ["tcp:25", "tcp:abc"]\nsubmission = ["smtp:587"]\n'
                           'pop3 = ["tcp:70000"]\nlmtp = ["unix:"]\n')
    assert problems(path) == [
        f"{path}:3: listen.mta: 'tcp:abc' is not a Twisted server endpoint (invalid literal for "
        "int() with base 10: 'abc'); e.g. 'tcp:25' or 'unix:/path/to.sock'",
        f"{path}:4: listen.submission: 'smtp:587' is not a Twisted server endpoint "
        "(Unknown endpoint type: 'smtp'); e.g. 'tcp:25' or 'unix:/path/to.sock'",
        f"{path}:5: listen.pop3: 'tcp:70000': the port must be between 0 and 65535",
        f"{path}:6: listen.lmtp: 'unix:': a unix: endpoint needs a socket path, "
        "e.g. 'unix:/run/mailsys/lmtp.sock'",
    ]


def test_ssl_endpoint_is_refused(tmp_path):
    path = write(tmp_path, '[listen]\nsubmissions = ["ssl:465:privateKey=k.pem"]\n')
    assert problems(path) == [f"{path}:2: listen.submissions: 'ssl:465:privateKey=k.pem': "
                              "use submissions/pop3s roles for implicit TLS, not ssl: endpoints"]


def test_endpoint_in_two_roles(tmp_path):
    path = write(tmp_path, '[listen]\nmta = ["tcp:25"]\nsubmission = ["tcp:25"]\n')
    assert problems(path) == [f"{path}:3: listen.submission: 'tcp:25' is also listed for "
                              "listen.mta; an endpoint serves one role"]


def test_bad_cidr_in_mynetworks(tmp_path):
    path = write(tmp_path, '[relay]\nmynetworks = ["127.0.0.0/8", "10.0.0.0/33", "lan"]\n')
    assert problems(path) == [
        f"{path}:2: relay.mynetworks: '10.0.0.0/33' is not an IP network (ADDRESS/PREFIX or a bare address)",
        f"{path}:2: relay.mynetworks: 'lan' is not an IP network (ADDRESS/PREFIX or a bare address)",
    ]


def test_bad_outbound_tls_and_store(tmp_path):
    path = write(tmp_path, '[mailbox]\ndefault_store = "MH"\n[relay]\noutbound_tls = "sometimes"\n')
    assert problems(path) == [
        f"{path}:2: mailbox.default_store: must be one of maildir, mbox, got 'MH'",
        f"{path}:4: relay.outbound_tls: must be one of none, may, encrypt, got 'sometimes'",
    ]


def test_bad_transport_values(tmp_path):
    path = write(tmp_path, '[relay.transport]\n"ok.example" = "smtp:[10.0.0.5]:25"\n'
                           '"a.example" = "ftp:x"\n"b.example" = "lmtp:host"\n"bad_dom" = "smtp:x"\n'
                           '"c.example" = "lmtp:mail.example:24"\n"d.example" = "lmtp:[mx.example]:24"\n'
                           '"e.example" = "lmtp:[::1]:24"\n"f.example" = "lmtp:127.0.0.1:24"\n')
    hint = ('the next hop must be "smtp:host[:port]", "smtp:[host]:port", "lmtp:IP:port" '
            'or "lmtp:unix:PATH"')
    assert problems(path) == [
        f"{path}:3: relay.transport: 'a.example' = 'ftp:x': {hint}",
        f"{path}:4: relay.transport: 'b.example' = 'lmtp:host': {hint}",
        f"{path}:5: relay.transport: 'bad_dom' is not a domain name",
        # The LMTP courier connects to an address: a host name would defer every message.
        f"{path}:6: relay.transport: 'c.example' = 'lmtp:mail.example:24': {hint}",
        f"{path}:7: relay.transport: 'd.example' = 'lmtp:[mx.example]:24': {hint}",
    ]
    path = write(tmp_path, '[relay]\ntransport = { "a.example" = 5 }\n')
    assert problems(path) == [f"{path}:2: relay.transport: 'a.example' = 5: {hint}"]


def test_bad_smarthost_and_nameservers(tmp_path):
    path = write(tmp_path, '[relay]\nsmarthost = "[relay.example:25"\n'
                           '[dns]\nnameservers = ["192.0.2.1:0", "2001:db8::1:53:x", "dns.example"]\n')
    ns = 'is not a name server; use "ip", "ip:port" or "[ipv6]:port"'
    assert problems(path) == [
        f"{path}:2: relay.smarthost: '[relay.example:25' is not a smart host; use \"host:port\", "
        "\"[host]:port\", \"host\" or \"[host]\" (brackets: no MX lookup)",
        f"{path}:4: dns.nameservers: '192.0.2.1:0' {ns}",
        f"{path}:4: dns.nameservers: '2001:db8::1:53:x' {ns}",
        f"{path}:4: dns.nameservers: 'dns.example' {ns}",
    ]


@pytest.mark.parametrize("good", ["", "relay.example", "relay.example:587", "[relay.example]",
                                  "[relay.example]:25", "[192.0.2.1]:25", "[2001:db8::1]:25"])
def test_good_smarthosts(tmp_path, good):
    assert load(write(tmp_path, f'[relay]\nsmarthost = "{good}"\n')).relay.smarthost == good


def test_bad_domains_and_overlap(tmp_path):
    path = write(tmp_path, '[domains]\nlocal = ["example.com", "-bad.example"]\nrelay = ["a..b"]\n')
    assert problems(path) == [
        f"{path}:2: domains.local: '-bad.example' is not a domain name (letters, digits, hyphens "
        "and dots, or an internationalised name)",
        f"{path}:3: domains.relay: 'a..b' is not a domain name (letters, digits, hyphens "
        "and dots, or an internationalised name)",
    ]
    path = write(tmp_path, '[domains]\nlocal = ["Example.com"]\nrelay = ["example.COM."]\n')
    assert problems(path) == [f"{path}:3: domains.relay: 'example.com' is also in domains.local; "
                              "a domain is either delivered here or relayed onward, not both"]


def test_empty_path_and_hostname(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "bad host"\n[tls]\nkey = ""\n')
    assert problems(path) == [
        f"{path}:2: server.hostname: 'bad host' is not a valid hostname",
        f"{path}:4: tls.key: must not be empty",
    ]


def test_toml_syntax_error_reports_its_line(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "a.example"\nstate_dir = \n')
    assert problems(path) == [f"{path}:3: server.state_dir: TOML syntax error: Invalid value (column 13)"]
    path = write(tmp_path, '[server]\n\n[limits\n')
    assert problems(path) == [f"{path}:3: (syntax): TOML syntax error: "
                              "Expected ']' at the end of a table declaration (column 8)"]


def test_duplicate_key_is_a_syntax_error_on_its_line(tmp_path):
    path = write(tmp_path, '[limits]\nrecipients = 5\n\nrecipients = 6\n')
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: limits.recipients: TOML syntax error: Cannot overwrite a value")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    assert problems(path) == [f"cannot read the configuration file {path}: No such file or "
                              "directory; check --config or $MAILSYS_CONFIG"]


def test_directory_as_path(tmp_path):
    assert problems(str(tmp_path)) == [f"cannot read the configuration file {tmp_path}: Is a "
                                       "directory; check --config or $MAILSYS_CONFIG"]


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    assert problems(str(path)) == [f"cannot read the configuration file {path}: not UTF-8 text "
                                   "(invalid continuation byte at byte 24); check --config or "
                                   "$MAILSYS_CONFIG"]


def test_all_problems_reported_together_in_file_order(tmp_path):
    path = write(tmp_path, """# a comment
[limits]
message_size = "big"

[server]
hostnme = "x"

[relay]
outbound_tls = "sometimes"
mynetworks = ["10.0.0.0/33"]

[listen]
mta = ["ssl:465"]

[extra]
""")
    assert problems(path) == [
        f"{path}:3: limits.message_size: must be an integer, got 'big'",
        f"{path}:6: server.hostnme: unknown key; did you mean 'hostname'?",
        f"{path}:9: relay.outbound_tls: must be one of none, may, encrypt, got 'sometimes'",
        f"{path}:10: relay.mynetworks: '10.0.0.0/33' is not an IP network (ADDRESS/PREFIX or a bare address)",
        f"{path}:13: listen.mta: 'ssl:465': use submissions/pop3s roles for implicit TLS, not ssl: endpoints",
        f"{path}:15: extra: unknown section; known: server, listen, tls, domains, accounts, "
        "mailbox, relay, queue, limits, dns",
    ]


def test_line_finding_copes_with_quotes_spaces_and_multiline_values(tmp_path):
    path = write(tmp_path, """[ "limits" ]
  "recipients"   =   "x"
[listen]
mta = [
  "tcp:25",
  "tcp:bad",
]
[server]
hostname = \"\"\"
fake = 1
\"\"\"
""")
    assert problems(path) == [
        f"{path}:2: limits.recipients: must be an integer, got 'x'",
        f"{path}:4: listen.mta: 'tcp:bad' is not a Twisted server endpoint (invalid literal for "
        "int() with base 10: 'bad'); e.g. 'tcp:25' or 'unix:/path/to.sock'",
        f"{path}:9: server.hostname: 'fake = 1\\n' is not a valid hostname",
    ]


def test_embedded_problems_name_the_embedded_source(monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "getfqdn", lambda: "not a.name")
    monkeypatch.setattr(socket, "gethostname", lambda: "not a.name")
    with pytest.raises(ConfigError) as info:
        embedded_default(str(tmp_path))
    assert info.value.problems == ["<embedded default>:1: server.hostname: this machine's name "
                                   "'not a.name' is not a valid hostname; set server.hostname"]


# --- the shipped etc/mailsys.toml stays honest --------------------------------------

KEY_LINE = re.compile(r"^# ([a-z0-9_]+ = .*)$")


def uncommented(text):
    return "\n".join(KEY_LINE.sub(r"\1", line) for line in text.splitlines()) + "\n"


def test_shipped_file_loads_as_it_is(tmp_path):
    """Everything in it is commented out, so it is exactly the defaults."""
    shipped, empty = load(SHIPPED), load(write(tmp_path, ""))
    assert shipped.source == SHIPPED
    assert dataclasses.replace(shipped, source=empty.source) == empty


def test_shipped_file_lists_every_key_with_its_default(tmp_path):
    with open(SHIPPED) as f:
        text = uncommented(f.read())
    assert "[listen]" in text and "\nmta = " in text  # the regex did uncomment lines
    path = write(tmp_path, text)
    listed = load(path)
    default = load(write(tmp_path, "", "empty.toml"))
    # hostname is machine-dependent: the file shows an example instead
    assert listed.server.hostname == "mail.example.com"
    listed = dataclasses.replace(listed, source=default.source,
                                 server=dataclasses.replace(listed.server, hostname=default.server.hostname))
    assert listed == default


def test_shipped_file_lists_keys_in_contract_order(tmp_path):
    keys = []
    section = None
    with open(SHIPPED) as f:
        for line in f:
            if line.startswith("["):
                section = line.strip()[1:-1]
            elif KEY_LINE.match(line):
                keys.append((section, line[2:].split(" =")[0]))
    assert keys == [(s, k) for s, table in cfg.DEFAULTS.items() for k in table]


# --- mailsys config check ------------------------------------------------------------

def check(path):
    return cfg.cli_check(argparse.Namespace(config=path))


# Keys that make a file pass `config check` on any machine: no implicit-TLS role
# needing a certificate, accounts files of the test's own.
NO_TLS = '[listen]\nsubmissions = []\npop3s = []\n'


def startable(tmp_path, text=""):
    return (text + NO_TLS + f'[accounts]\nusers = "{tmp_path}/users"\n'
            f'aliases = "{tmp_path}/aliases"\n')


def test_cli_check_ok(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    path = write(tmp_path, startable(tmp_path, '[domains]\nlocal = ["example.org"]\n'
                                     'relay = ["backup.example"]\n').replace(
                                         "[listen]\n", "[listen]\npop3 = []\n"))
    assert check(path) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert len(lines) <= 25
    assert lines[0] == f"config ok: {path}"
    assert "listen pop3:        disabled" in lines
    assert "listen mta:         tcp:25" in lines
    assert "local domains:      example.org" in lines
    assert "relay domains:      backup.example" in lines
    assert "mynetworks:         127.0.0.0/8, ::1/128" in lines
    assert any(line.startswith("limits:") and "message_size 26214400" in line for line in lines)


def test_cli_check_problems(tmp_path, capsys):
    path = write(tmp_path, startable(tmp_path, '[limits]\nmessage_size = "big"\nfoo = 1\n'))
    assert check(path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"{path}:2: limits.message_size: must be an integer, got 'big'",
                                f"{path}:3: limits.foo: unknown key; known: message_size, recipients, "
                                "connections, connections_per_ip, command_timeout, data_timeout, "
                                "auth_failures"]


def test_cli_check_embedded_default_and_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    assert check(None) == 0
    assert capsys.readouterr().out.splitlines()[0] == "config ok: <embedded default>"
    path = write(tmp_path, startable(tmp_path, "[bogus]\n"))
    monkeypatch.setenv("MAILSYS_CONFIG", path)
    assert check(None) == 2
    assert capsys.readouterr().err.startswith(f"{path}:1: bogus: unknown section")


def test_mailsys_config_check_command(tmp_path, capsys):
    from mailsys.cli import main

    good = write(tmp_path, startable(tmp_path))
    assert main(["config", "check", "--config", good]) == 0
    assert capsys.readouterr().out.startswith(f"config ok: {good}\n")
    bad = write(tmp_path, startable(tmp_path, "[queue]\nlifetime = -1\n"), "bad.toml")
    assert main(["config", "check", "--config", bad]) == 2
    assert capsys.readouterr().err == f"{bad}:2: queue.lifetime: must be at least 0, got -1\n"
    # --config also works before the subcommand
    assert main(["--config", bad, "config", "check"]) == 2


# --- config check reads what the server reads at start -----------------------------

ARGON = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


def check_lines(path, capsys):
    """``mailsys config check`` on ``path``: (status, stderr lines); stdout must be
    empty when it fails."""
    status = check(path)
    out, err = capsys.readouterr()
    if status:
        assert out == ""
    return status, err.splitlines()


def test_check_reports_bad_accounts_files_at_their_own_lines(tmp_path, capsys):
    (tmp_path / "users").write_text(f"# accounts\nok@example.com:{ARGON}\n"
                                    "p1@example.com:{PLAIN}x\n")
    (tmp_path / "aliases").write_text("postmaster: ok@example.com\nno colon here\n")
    path = write(tmp_path, startable(tmp_path))
    load(path)   # other commands (user add, ...) still load it: they fix these files
    assert check_lines(path, capsys) == (2, [
        f"{tmp_path}/users:3: accounts.users: unsupported password scheme {{PLAIN}}: only "
        "{ARGON2ID} and {BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`",
        f"{tmp_path}/aliases:2: accounts.aliases: expected 'name: target, target, ...'; "
        "fix that line",
    ])


def test_check_reports_every_bad_line_of_an_accounts_file(tmp_path, capsys):
    """One run names every bad line, in file order, not one per fix-and-rerun."""
    (tmp_path / "users").write_text(f"p1@example.com:{{PLAIN}}x\nok@example.com:{ARGON}\n"
                                    f"ok@example.com:{ARGON}\nnobody-at-all:{ARGON}\n")
    (tmp_path / "aliases").write_text("  stray continuation\npostmaster: ok@example.com\n"
                                      "postmaster: ok@example.com\nempty:\n")
    path = write(tmp_path, startable(tmp_path))
    status, lines = check_lines(path, capsys)
    assert (status, lines) == (2, [
        f"{tmp_path}/users:1: accounts.users: unsupported password scheme {{PLAIN}}: only "
        "{ARGON2ID} and {BLF-CRYPT} are accepted; set a new password with `mailsys user passwd`",
        f"{tmp_path}/users:3: accounts.users: duplicate account ok@example.com (first at line "
        "2); fix that line",
        f"{tmp_path}/users:4: accounts.users: " + lines[2].split(": accounts.users: ", 1)[1],
        f"{tmp_path}/aliases:1: accounts.aliases: continuation line (starts with white space) "
        "before any alias; remove the leading white space",
        f"{tmp_path}/aliases:3: accounts.aliases: duplicate alias 'postmaster' (first at line "
        "2); fix that line",
        f"{tmp_path}/aliases:4: accounts.aliases: alias 'empty' has no targets; fix that line",
    ])
    assert "nobody-at-all" in lines[2]


def test_check_names_at_most_twenty_bad_lines_of_a_file(tmp_path, capsys):
    (tmp_path / "aliases").write_text("".join(f"bad line {i}\n" for i in range(1, 26)))
    path = write(tmp_path, startable(tmp_path))
    status, lines = check_lines(path, capsys)
    assert status == 2 and len(lines) == 21
    assert lines[19] == (f"{tmp_path}/aliases:20: accounts.aliases: expected 'name: target, "
                         "target, ...'; fix that line")
    assert lines[20].endswith(": accounts.aliases: 5 more bad lines not shown; fix the ones "
                              "above and check again")


def test_check_refuses_a_directory_as_users_file(tmp_path, capsys):
    path = write(tmp_path, NO_TLS + '[accounts]\nusers = "/etc"\n'
                 f'aliases = "{tmp_path}/aliases"\n')
    assert check_lines(path, capsys) == (2, [
        f"{path}:5: accounts.users: /etc is a directory; point accounts.users at the users "
        "file (it need not exist yet)"])


def test_check_needs_a_certificate_for_implicit_tls(tmp_path, capsys):
    path = write(tmp_path, startable(tmp_path).replace(NO_TLS, "[listen]\npop3s = []\n")
                 + f'[tls]\ncertificate = "{tmp_path}/cert.pem"\nkey = "{tmp_path}/key.pem"\n')
    assert check_lines(path, capsys) == (2, [
        f"{path}:1: listen.submissions: implicit TLS needs a certificate and key, but "
        f"{tmp_path}/cert.pem and {tmp_path}/key.pem do not exist; run 'mailsys tls "
        "self-signed', point [tls] at your certificate, or set submissions = []"])
    # Without an implicit-TLS role the server starts without STARTTLS, and so does the check.
    path = write(tmp_path, startable(tmp_path)
                 + f'[tls]\ncertificate = "{tmp_path}/cert.pem"\nkey = "{tmp_path}/key.pem"\n')
    status, _ = check_lines(path, capsys)
    assert status == 0


def tls_config(tmp_path, certificate, key):
    return write(tmp_path, startable(tmp_path) + f'[tls]\ncertificate = "{certificate}"\n'
                 f'key = "{key}"\n')


def test_check_loads_the_tls_pair(tmp_path, capsys):
    from mailsys.tls import write_self_signed

    write_self_signed("a.example", str(tmp_path / "a.pem"), str(tmp_path / "a.key"))
    write_self_signed("b.example", str(tmp_path / "b.pem"), str(tmp_path / "b.key"))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    fix = "; run 'mailsys tls self-signed --force' or point [tls] at a matching certificate and key"

    assert check_lines(tls_config(tmp_path, tmp_path / "a.pem", tmp_path / "a.key"), capsys)[0] == 0
    path = tls_config(tmp_path, tmp_path / "a.pem", tmp_path / "b.key")
    assert check_lines(path, capsys) == (2, [
        f"{path}:9: tls.key: {tmp_path}/b.key is not the private key of the certificate in "
        f"{tmp_path}/a.pem" + fix])
    path = tls_config(tmp_path, tmp_path / "garbage.pem", tmp_path / "a.key")
    assert check_lines(path, capsys) == (2, [
        f"{path}:8: tls.certificate: {tmp_path}/garbage.pem holds no PEM certificate" + fix])
    path = tls_config(tmp_path, tmp_path / "a.pem", tmp_path / "garbage.pem")
    assert check_lines(path, capsys) == (2, [
        f"{path}:9: tls.key: {tmp_path}/garbage.pem holds no unencrypted PEM private key" + fix])
    (tmp_path / "a.pem").chmod(0)
    if os.geteuid() != 0:   # root reads it anyway
        path = tls_config(tmp_path, tmp_path / "a.pem", tmp_path / "a.key")
        assert check_lines(path, capsys) == (2, [
            f"{path}:8: tls.certificate: cannot read {tmp_path}/a.pem: Permission denied" + fix])


def test_check_embedded_default_without_a_certificate_yet(tmp_path, capsys, monkeypatch):
    """The development host writes its self-signed pair on first start."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILSYS_CONFIG", raising=False)
    assert check(None) == 0
    assert not (tmp_path / "var").exists()   # checking writes nothing


def test_check_reports_smarthost_auth_with_its_line_and_the_other_problems(tmp_path, capsys):
    auth = tmp_path / "auth"
    auth.write_text("user:secret\n")
    auth.chmod(0o644)
    path = write(tmp_path, startable(tmp_path, '[relay]\nsmarthost = "[192.0.2.1]:587"\n'
                                     f'smarthost_auth = "{auth}"\n[limits]\nrecipients = 0\n'))
    assert check_lines(path, capsys) == (2, [
        f"{path}:3: relay.smarthost_auth: {auth} has mode 0644; it holds a password, so only "
        f"its owner may read it: run 'chmod 600 {auth}'",
        f"{path}:5: limits.recipients: must be at least 1, got 0",
    ])
    auth.unlink()
    assert check_lines(path, capsys)[1][0] == (
        f"{path}:3: relay.smarthost_auth: cannot read {auth}: No such file or directory; create "
        "it holding one line \"username:password\" (mode 0600), or set smarthost_auth = \"\"")
    auth.write_text("no colon\n")
    auth.chmod(0o600)
    assert check_lines(path, capsys)[1][0] == (
        f"{path}:3: relay.smarthost_auth: {auth} must hold one line \"username:password\"")


def test_summary_tells_that_smarthost_auth_encrypts(tmp_path, capsys):
    auth = tmp_path / "auth"
    auth.write_text("user:secret\n")
    auth.chmod(0o600)
    path = write(tmp_path, startable(tmp_path, '[relay]\nsmarthost = "[192.0.2.1]:587"\n'
                                     f'smarthost_auth = "{auth}"\n'
                                     'transport = { "corp.example" = "smtp:[192.0.2.9]" }\n'))
    assert check(path) == 0
    assert ("outbound:           smart host [192.0.2.1]:587 with AUTH, tls encrypt (AUTH "
            "requires it), 1 transport entries (tls may)") in capsys.readouterr().out.splitlines()
    path = write(tmp_path, startable(tmp_path, f'[relay]\nsmarthost_auth = "{auth}"\n'))
    assert check(path) == 0
    assert ("outbound:           by MX, tls may (smarthost_auth unused: no smarthost)"
            in capsys.readouterr().out.splitlines())


def test_endpoints_that_could_never_bind(tmp_path):
    long_dir = "/tmp/" + "d" * (107 - len("/tmp//lmtp.sock"))
    assert len(f"{long_dir}/lmtp.sock") == 107
    load(write(tmp_path, f'[listen]\nlmtp = ["unix:{long_dir}/lmtp.sock"]\n'))   # just fits
    path = write(tmp_path, '[listen]\nmta = ["tcp:2525:interface=999.1.1.1"]\n'
                           'submission = ["tcp6:2587:interface=127.0.0.1"]\n'
                           'pop3 = ["tcp:2110:mail.example.com"]\n'
                           f'lmtp = ["unix:{long_dir}x/lmtp.sock"]\n')
    assert problems(path) == [
        f"{path}:2: listen.mta: 'tcp:2525:interface=999.1.1.1': the interface '999.1.1.1' is not "
        "an IP address; use e.g. interface=127.0.0.1 (IPv6: interface=\\:\\:1)",
        f"{path}:3: listen.submission: 'tcp6:2587:interface=127.0.0.1': the interface "
        "'127.0.0.1' is not an IPv6 address; use e.g. interface=127.0.0.1 (IPv6: "
        "interface=\\:\\:1)",
        f"{path}:4: listen.pop3: 'tcp:2110:mail.example.com': the interface 'mail.example.com' "
        "is not an IP address; use e.g. interface=127.0.0.1 (IPv6: interface=\\:\\:1)",
        f"{path}:5: listen.lmtp: 'unix:{long_dir}x/lmtp.sock': the socket path is 108 bytes, "
        "longer than the 107 a unix socket can have; choose a shorter path",
    ]


def test_lmtp_socket_follows_state_dir(tmp_path):
    assert load(write(tmp_path, "")).listen.lmtp == ("unix:/var/lib/mailsys/lmtp.sock",)
    c = load(write(tmp_path, '[server]\nstate_dir = "run:1"\n'))
    assert c.server.state_dir == f"{tmp_path}/run:1"
    assert c.listen.lmtp == (f"unix:{tmp_path}/run\\:1/lmtp.sock",)
    c = load(write(tmp_path, '[server]\nstate_dir = "st"\n[listen]\nlmtp = ["tcp:24"]\n'))
    assert c.listen.lmtp == ("tcp:24",)


@pytest.mark.parametrize("fqdn, hostname, expected", [
    ("mail.example.com", "mail", "mail.example.com"),          # getfqdn knows better
    ("localhost", "mx1.example.org", "mx1.example.org"),       # /etc/hosts: 127.0.1.1 localhost mx1
    ("localhost.localdomain", "mx1.example.org", "mx1.example.org"),
    ("localhost", "vm", "vm.localdomain"),                     # Postfix: myhostname + mydomain
    ("vm", "vm", "vm.localdomain"),
    ("localhost", "localhost", "localhost.localdomain"),
])
def test_default_hostname_avoids_localhost(tmp_path, monkeypatch, fqdn, hostname, expected):
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert load(write(tmp_path, "")).server.hostname == expected


@pytest.mark.parametrize("argv", [["config", "check"], ["user", "list"],
                                  ["tls", "self-signed"], ["queue", "list"]])
def test_missing_configuration_file_is_one_sentence(tmp_path, capsys, argv):
    from mailsys.cli import main

    path = tmp_path / "nonexistent.toml"
    assert main(argv + ["--config", str(path)]) == 2
    assert capsys.readouterr() == ("", f"mailsys: cannot read the configuration file {path}: "
                                   "No such file or directory; check --config or "
                                   "$MAILSYS_CONFIG\n")


def test_state_dir_too_long_for_its_sockets(tmp_path):
    fits = "/tmp/" + "s" * (107 - len("/tmp//public/submit.sock"))
    load(write(tmp_path, f'[server]\nstate_dir = "{fits}"\n'))
    path = write(tmp_path, f'[server]\nstate_dir = "{fits}s"\n')
    assert problems(path) == [
        f"{path}:2: server.state_dir: {fits}s/public/submit.sock would be 108 bytes, longer "
        "than the 107 a unix socket can have; choose a shorter state_dir"]
