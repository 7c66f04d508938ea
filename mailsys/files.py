"""Durable file replacement, in one place for every writer of small state files
(users file, certificates, the queue journal's compaction), and the small
helpers every writer of files shares."""
import contextlib
import os
import tempfile


def write_all(fd, data):
    """Write all of ``data`` to ``fd``: ``os.write`` may write less than asked
    (a signal, a full pipe, a file system's own limits)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_path(path, flags=0):
    """``fsync`` a file or a directory by name: a file's data, a directory's
    entries (a rename, a new file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory):
    """Make a directory's entries (a rename, a new file) durable; refuses a path
    that is not a directory."""
    fsync_path(directory, getattr(os, "O_DIRECTORY", 0))


def write_atomically(path, data, mode=0o600, keep_owner=False):
    """Replace ``path`` with ``data`` (bytes): a temporary file in the same
    directory with ``mode``, fsync, rename, fsync the directory.  Readers see the
    old file or the new one, never a mix, and a crash leaves one of the two.
    With ``keep_owner`` an existing file's owner and group are kept (a file the
    server reads stays readable after root edits it)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if keep_owner:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    pass
                else:
                    with contextlib.suppress(PermissionError):
                        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                            os.fchown(f.fileno(), st.st_uid, st.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
