"""Fixtures that start real processes on loopback and always clean them up."""
import pytest

from tests.integration.harness import HarnessError, MailsysServer, PostfixPeer

# Accounts every test server knows; added once per session with the real CLI.
USERS = ("joe@example.com", "bob@example.net")


@pytest.fixture(scope="session")
def users_text(tmp_path_factory):
    """A users file written by ``python -m mailsys user add`` (CONTRACT section 1).

    Hashing is deliberately slow (Argon2id), so the CLI runs once per session and
    every test server gets a copy of the file it wrote.
    """
    base = tmp_path_factory.mktemp("accounts")
    server = MailsysServer(base)   # only its configuration is used: nothing is started
    for address in USERS:
        p = server.mailsys_cli("user", "add", address, "--password-stdin",
                               input="integration test password\n")
        if p.returncode != 0:
            raise HarnessError(f"`mailsys user add {address} --password-stdin` exited "
                               f"{p.returncode}:\n{p.stdout}{p.stderr}")
    text = server.users_path.read_text()
    for address in USERS:
        assert any(line.startswith(address + ":{ARGON2ID}") for line in text.splitlines()), text
    return text


@pytest.fixture
def make_server(tmp_path, users_text):
    """``make_server(overrides=None, start=True)`` -> a MailsysServer; all are stopped at teardown."""
    servers = []

    def make(overrides=None, start=True, name=None):
        base = tmp_path / (name or f"mailsys{len(servers)}")
        server = MailsysServer(base, overrides, users_text=users_text)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.cleanup()


@pytest.fixture
def server(make_server):
    """A running mailsys with the default test configuration."""
    return make_server()


@pytest.fixture
def postfix_peer(tmp_path):
    """``postfix_peer(relayhost)`` -> a running PostfixPeer; stopped at teardown."""
    peers = []

    def make(relayhost):
        peer = PostfixPeer(tmp_path / f"postfix{len(peers)}", relayhost)
        peers.append(peer)
        return peer.start()

    yield make
    for peer in peers:
        peer.stop()

