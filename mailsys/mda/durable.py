"""Making a batch of new files and directory entries durable.

The MDA writes a batch of messages into ``tmp/``, makes them durable, links
them into ``new/`` and makes the links durable: nothing is visible in ``new/``
before its bytes are on disk, and nothing is acknowledged before its
directory entry is.  Each path gets its own ``fsync``, as Postfix's and
Dovecot's deliveries do.

Why not one ``syncfs`` per batch (what this module did until the tenth
session): ``syncfs`` writes back every dirty page of the whole file system,
so each delivery waited for whatever else was being written there -- the
spool segment being filled, the logs, a backup or a database on the same
``/var`` -- and a busy neighbour stretched delivery times for all mailboxes.
Before Linux 5.8 it also did not report write-back errors at all, so a
failing disk could have been acknowledged as a delivery.  ``fsync`` reports
the file's own errors on every kernel.  Measured on this project's benchmark
machine: without a neighbour, as fast within the noise (one session faster);
next to one writing 50-300 MB/s to the same file system, faster and with a
shorter tail of delivery times (docs/performance.rst, tenth session).
"""
from mailsys.files import fsync_path


def flush(paths):
    """Make the data and entries of ``paths`` (files or directories) durable,
    one ``fsync`` each, in order.  Raises OSError on the first failure.

    ``fsync`` rather than ``fdatasync`` so that one call serves both: for a
    directory it is what makes its new entries durable, and for a file
    written once and never again the two write the same inode."""
    for path in paths:
        fsync_path(path)
