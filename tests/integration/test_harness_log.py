"""The harness reads "the log since start()" across twistd's log rotation.

A start-up that happened to coincide with a rotation (FILE -> FILE.1 at 1 MB)
made start() wait for a line that was already written, in FILE.1, and fail
after its timeout: seen once in test_crash.py, whose restarts log a lot."""
import os

from tests.integration.harness import MailsysServer


def server_at(tmp_path):
    server = MailsysServer.__new__(MailsysServer)     # only the log fields, no config
    server.log_path = tmp_path / "mailsys.log"
    server._log_offset = 0
    server._log_inode = None
    return server


def mark_start(server):
    server._log_offset = server.log_path.stat().st_size
    server._log_inode = server.log_path.stat().st_ino


def rotate(path):
    for n in range(8, 0, -1):
        older = f"{path}.{n}"
        if os.path.exists(older):
            os.rename(older, f"{path}.{n + 1}")
    os.rename(path, f"{path}.1")


def test_no_rotation(tmp_path):
    server = server_at(tmp_path)
    assert server.log_since_start() == ""
    server.log_path.write_text("before\n")
    mark_start(server)
    with open(server.log_path, "a") as f:
        f.write("after 1\n")
    assert server.log_since_start() == "after 1\n"


def test_one_rotation_since_start(tmp_path):
    server = server_at(tmp_path)
    server.log_path.write_text("x" * 100 + "\n")
    mark_start(server)
    with open(server.log_path, "a") as f:
        f.write("mailsys started\n")
    rotate(server.log_path)
    server.log_path.write_text("] disconnect from localhost\n" + "y" * 200 + "\n")
    assert server.log_since_start() == "mailsys started\n] disconnect from localhost\n" + "y" * 200 + "\n"


def test_two_rotations_since_start(tmp_path):
    server = server_at(tmp_path)
    server.log_path.write_text("old\n")
    mark_start(server)
    with open(server.log_path, "a") as f:
        f.write("a\n")
    rotate(server.log_path)
    server.log_path.write_text("b\n")
    rotate(server.log_path)
    server.log_path.write_text("c\n")
    assert server.log_since_start() == "a\nb\nc\n"
