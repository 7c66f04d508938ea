"""Making many new files durable at once.

``fsync`` per file costs a journal commit each; ``syncfs`` (Linux) flushes a
whole filesystem in one.  The MDA writes a batch of messages into ``tmp/``,
makes them durable together, links them into ``new/`` and makes the links
durable together: two flushes per batch instead of two per message, with the
same guarantee (nothing is visible in ``new/`` before its bytes are on disk, and
nothing is acknowledged before its directory entry is).
"""
import ctypes
import os

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
except (OSError, AttributeError):   # not Linux: fall back to fsync per path
    _syncfs = None


def flush(paths):
    """Make the data and entries of ``paths`` (files or directories) durable.

    One ``syncfs`` per filesystem they live on; ``fsync`` each when syncfs is
    missing.  Raises OSError on failure.
    """
    if _syncfs is None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    seen = {}
    dirs = set()
    for path in paths:
        # Files created in one directory (a batch's tmp/ files) live on its
        # filesystem: one stat for them all, not a system call per message on
        # the MDA's disk thread.
        parent = os.path.dirname(path)
        if parent in dirs:
            continue
        dirs.add(parent)
        dev = os.stat(path).st_dev
        if dev not in seen:
            seen[dev] = path
    for path in seen.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), path)
        finally:
            os.close(fd)
