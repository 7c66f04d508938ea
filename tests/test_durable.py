"""mailsys.mda.durable.flush: one fsync per path, in order, the first failure raised."""
import errno
import os

import pytest

from mailsys.mda import durable


def _record_fsyncs(monkeypatch, fail_at=None):
    synced, opened, closed = [], [], []
    real_open, real_close = os.open, os.close

    def fake_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened.append(fd)
        return fd

    def fake_close(fd):
        closed.append(fd)
        real_close(fd)

    def fake_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if fail_at is not None and len(synced) == fail_at:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "close", fake_close)
    monkeypatch.setattr(os, "fsync", fake_fsync)
    return synced, opened, closed


def _tree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    files = []
    for d in (a, a, b):
        f = d / f"m{len(files)}"
        f.write_bytes(b"x")
        files.append(str(f))
    return files, [str(a), str(b)]


def test_every_file_and_directory_is_synced_once_in_order(tmp_path, monkeypatch):
    files, dirs = _tree(tmp_path)
    synced, opened, closed = _record_fsyncs(monkeypatch)
    durable.flush(files + dirs)
    assert synced == files + dirs
    assert closed == opened and len(opened) == 5


def test_the_first_failure_is_raised_and_nothing_after_it_is_synced(tmp_path, monkeypatch):
    files, dirs = _tree(tmp_path)
    synced, opened, closed = _record_fsyncs(monkeypatch, fail_at=2)
    with pytest.raises(OSError) as e:
        durable.flush(files + dirs)
    assert e.value.errno == errno.EIO
    assert synced == files[:2]
    assert closed == opened and len(opened) == 2       # the failed one's descriptor too


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        durable.flush([str(tmp_path / "gone")])


def test_no_paths_no_calls(monkeypatch):
    synced, opened, _ = _record_fsyncs(monkeypatch)
    durable.flush([])
    assert synced == [] and opened == []
