"""mailsys.mda.durable.flush: one syncfs per filesystem, one stat per directory."""
import os

from mailsys.mda import durable


def test_one_stat_per_directory_and_one_syncfs_per_filesystem(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    files = []
    for d in (a, a, a, b):
        f = d / f"m{len(files)}"
        f.write_bytes(b"x")
        files.append(str(f))
    stats, syncs = [], []
    real_stat = os.stat
    monkeypatch.setattr(durable.os, "stat", lambda p: stats.append(p) or real_stat(p))
    monkeypatch.setattr(durable, "_syncfs", lambda fd: syncs.append(os.fstat(fd).st_dev) or 0)
    durable.flush(files + [str(a), str(b)])
    assert stats == [files[0], files[3], str(a)]      # a/ and b/ share tmp_path as parent
    assert syncs == [real_stat(str(tmp_path)).st_dev]


def test_a_second_filesystem_gets_its_own_syncfs(tmp_path, monkeypatch):
    other = "/dev/shm"      # a tmpfs on Linux, never the filesystem of tmp_path
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    syncs = []
    monkeypatch.setattr(durable, "_syncfs", lambda fd: syncs.append(os.fstat(fd).st_dev) or 0)
    f1 = tmp_path / "x"
    f1.write_bytes(b"x")
    f2 = os.path.join(other, f"mailsys-durable-test-{os.getpid()}")
    with open(f2, "wb") as f:
        f.write(b"x")
    try:
        durable.flush([str(f1), f2])
    finally:
        os.unlink(f2)
    assert syncs == [os.stat(tmp_path).st_dev, os.stat(other).st_dev]
