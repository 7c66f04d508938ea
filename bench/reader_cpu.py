"""CPU cost of the DATA readers alone: milliseconds per MiB of body.

Feeds a 1 MiB body (lines of a given length, as ``smtp-source`` and base64
attachments write them) through ``DataReader`` (the SMTP listeners: keeps CRLF)
and ``LFDataReader`` (the MDA: converts to LF on arrival) in segments of the
size Twisted reads, and prints the best of several rounds of process CPU time.
No sockets, no disk, no reactor: the steadiest figure on a noisy machine for
changes to mailsys/smtp/data.py.  Whole-path effects are measured by
bench/lmtp.py and bench/e2e.py.

    python3 bench/reader_cpu.py [--segment BYTES] [--lines 4 30 80 ...]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mailsys.smtp.data import DataReader, LFDataReader  # noqa: E402

MIB = 1024 * 1024


def body_of(line_length):
    """About 1 MiB of CRLF lines of ``line_length`` bytes (CRLF included), ended."""
    n = max(1, MIB // line_length)
    line = b"X" * (line_length - 2) + b"\r\n"
    return line * n + b".\r\n"


def cost(reader_class, wire, segment, rounds, repeat):
    """Best CPU milliseconds per MiB of ``wire`` over ``rounds`` rounds."""
    segments = [wire[i:i + segment] for i in range(0, len(wire), segment)]
    if reader_class is LFDataReader:
        def sink(chunk, size):
            pass
    else:
        def sink(chunk):
            pass
    best = None
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(repeat):
            reader = reader_class(sink)
            for s in segments:
                if reader.feed(s) is not None:
                    break
            assert not reader.bare_newline
        spent = (time.process_time() - start) / repeat
        best = spent if best is None else min(best, spent)
    return best * 1000 * MIB / len(wire)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segment", type=int, default=65536,
                    help="bytes per feed (Twisted reads 65536 at most)")
    ap.add_argument("--lines", type=int, nargs="+", default=[4, 10, 30, 78, 80, 200, 1000],
                    help="line lengths to try, CRLF included (78: base64; 80: smtp-source)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    print(f"{'line bytes':>10}  {'DataReader':>12}  {'LFDataReader':>13}   (CPU ms per MiB, best of {args.rounds})")
    for length in args.lines:
        wire = body_of(length)
        crlf = cost(DataReader, wire, args.segment, args.rounds, args.repeat)
        lf = cost(LFDataReader, wire, args.segment, args.rounds, args.repeat)
        print(f"{length:>10}  {crlf:>12.2f}  {lf:>13.2f}")


if __name__ == "__main__":
    main()
