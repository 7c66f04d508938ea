"""mailsys.files: the helpers every writer of files shares."""
import os

import pytest

from mailsys import files


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096])
def test_write_all_finishes_short_writes(tmp_path, monkeypatch, step):
    """os.write may write less than asked; write_all goes on until all is written."""
    data = bytes(range(256)) * 5
    real = os.write
    calls = []

    def short(fd, view):
        calls.append(len(view))
        return real(fd, bytes(view[:step]))

    monkeypatch.setattr(files.os, "write", short)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        files.write_all(fd, data)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
    assert len(calls) == -(-len(data) // step)


def test_write_all_of_nothing_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "write", lambda fd, view: pytest.fail("written"))
    files.write_all(-1, b"")
