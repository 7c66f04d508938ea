#!/usr/bin/env python3
"""How long each SMTP reply takes, one connection at a time (no parallelism).

Sends N messages of 4 KiB to an SMTP server on 127.0.0.1, each on its own
connection (connect, EHLO, MAIL, RCPT, DATA, the message, QUIT), and prints
the median and 90th percentile of every step.  It explains the one-session
case of the other benchmarks (``4k-1``), where throughput is the sum of these
latencies rather than a matter of CPU.  Start the server yourself, e.g. with
the configuration ``bench/e2e.py --keep`` leaves behind.

    python3 bench/reply_latency.py --port 2525 [--messages 400] [--rcpt joe@example.com]

Standard library only; only 127.0.0.1 is contacted.
"""
import argparse
import socket
import statistics
import time

STEPS = ("connect+greeting", "EHLO", "MAIL", "RCPT", "DATA", "message", "QUIT", "total")


def reply(f):
    """The last line of one (possibly multi-line) reply."""
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    return line


def one(port, rcpt, body, times):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, s.makefile("rb") as f:
        reply(f)
        times["connect+greeting"].append(time.perf_counter() - t0)
        for step, line in (("EHLO", b"EHLO client.example.org\r\n"),
                           ("MAIL", b"MAIL FROM:<bench@example.org>\r\n"),
                           ("RCPT", b"RCPT TO:<" + rcpt.encode() + b">\r\n"),
                           ("DATA", b"DATA\r\n"),
                           ("message", body + b".\r\n"),
                           ("QUIT", b"QUIT\r\n")):
            t = time.perf_counter()
            s.sendall(line)
            answer = reply(f)
            times[step].append(time.perf_counter() - t)
            if answer[:1] not in (b"2", b"3"):
                raise RuntimeError(f"{step}: {answer!r}")
    times["total"].append(time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rcpt", default="joe@example.com")
    args = ap.parse_args()
    body = b"Subject: latency\r\n\r\n" + (b"y" * 76 + b"\r\n") * 52     # about 4 KiB
    for _ in range(args.warmup):
        one(args.port, args.rcpt, body, {k: [] for k in STEPS})
    times = {k: [] for k in STEPS}
    for _ in range(args.messages):
        one(args.port, args.rcpt, body, times)
    for k in STEPS:
        v = sorted(times[k])
        print(f"{k:17} median {1e3 * statistics.median(v):6.3f} ms   "
              f"p90 {1e3 * v[int(0.9 * (len(v) - 1))]:6.3f} ms")


if __name__ == "__main__":
    main()
