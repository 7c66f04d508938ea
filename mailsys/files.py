"""Durable file replacement, in one place for every writer of small state files
(users file, certificates, the queue journal's compaction), and the small
helpers every writer of files shares."""
import contextlib
import errno
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
    tmp = _write_temporary(path, data, mode, keep_owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def _write_temporary(path, data, mode, keep_owner=False):
    """A fsynced temporary file next to ``path`` holding ``data``; its name."""
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def write_together(files, dir_mode=0o700):
    """Write every ``(path, data, mode)`` of ``files``, or none of them.

    For files that only work as a set (a certificate and its key): the
    directories are made and every temporary file written and fsynced before
    the first rename, so a directory that cannot be made or a full disk leaves
    the old files (and no new directory) behind.  Only a failing rename, after
    all the writing, could still leave a mix.  OSError says what failed."""
    made, temporaries = [], []
    try:
        for path, data, mode in files:
            path = os.path.abspath(path)
            if os.path.isdir(path):   # found now, not at the rename after another file's
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            directory = os.path.dirname(path)
            missing = []
            parent = directory
            while not os.path.isdir(parent) and parent != os.path.dirname(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            for d in reversed(missing):
                os.mkdir(d, dir_mode)
                made.append(d)
            temporaries.append((_write_temporary(path, data, mode), path))
        for tmp, path in temporaries:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    for directory in dict.fromkeys(os.path.dirname(path) for _, path in temporaries):
        fsync_dir(directory)
