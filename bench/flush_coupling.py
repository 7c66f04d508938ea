#!/usr/bin/env python3
"""How long one delivery's flush waits next to another tenant's unflushed writes.

A "neighbour" writes N MB into a file with ordinary buffered writes and never
flushes them (a backup, a log, a database on the same ``/var``).  Then a 4 KiB
message file is written and made durable two ways, each timed:

* ``fsync``: the file, then its directory -- what mailsys's MDA does
  (mailsys.mda.durable) and what Postfix and Dovecot do;
* ``syncfs``: one flush of the whole file system -- what the MDA did until the
  tenth session, which writes back the neighbour's dirty pages too.

It explains why the MDA flushes per file (docs/performance.rst, tenth session).
The files go into ``--dir`` (default: a new directory under /tmp), which must be
on the file system to judge; nothing else is touched.  Linux only.

    python3 bench/flush_coupling.py [--mb 0 256 1024] [--repeat 3] [--dir DIR]
"""
import argparse
import ctypes
import os
import statistics
import tempfile
import time


def one(directory, mb, mode, syncfs):
    neighbour = os.path.join(directory, "neighbour.dat")
    message = os.path.join(directory, "message.tmp")
    fd = os.open(neighbour, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"n" * (1 << 20)
    try:
        for _ in range(mb):
            os.write(fd, block)
    finally:
        os.close(fd)
    m = os.open(message, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(m, b"m" * 4096)
        start = time.perf_counter()
        if mode == "fsync":
            os.fsync(m)
            d = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(d)
            finally:
                os.close(d)
        elif syncfs(m) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        return time.perf_counter() - start
    finally:
        os.close(m)
        os.unlink(message)
        os.unlink(neighbour)
        os.sync()       # the next measurement starts with nothing dirty


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[0, 256, 1024],
                    help="the neighbour's unflushed megabytes (default 0 256 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per figure (median shown)")
    ap.add_argument("--dir", default=None, help="directory on the file system to judge")
    args = ap.parse_args(argv)
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = libc.syncfs
    syncfs.argtypes = [ctypes.c_int]
    directory = args.dir or tempfile.mkdtemp(prefix="flush-coupling-")
    print(f"directory {directory}; medians of {args.repeat}")
    for mb in args.mb:
        row = []
        for mode in ("fsync", "syncfs"):
            os.sync()
            t = statistics.median(one(directory, mb, mode, syncfs) for _ in range(args.repeat))
            row.append(f"{mode} {1000 * t:8.1f} ms")
        print(f"neighbour {mb:5d} MB unflushed:  " + "   ".join(row))
    if args.dir is None:
        os.rmdir(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
