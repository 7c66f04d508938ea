"""The floor under bench/receive.py's 4k-20 case: how fast can *any* Twisted server be here?

Starts a minimal SMTP responder on Twisted -- greeting, one fixed reply per command,
the DATA body scanned for ``<CRLF>.<CRLF>`` and thrown away; no parsing, no policy,
no disk, no logging -- and Postfix's ``smtp-sink`` (a C server that does the same),
and drives both with ``smtp-source`` exactly as ``bench/receive.py`` does (same
arguments, same cases), interleaved, in the same run.  ``--processes 2`` runs two
copies of the responder on one listening socket (one per CPU), as mailsys's
``server.workers`` does.

What it tells: a figure a real mail server written on Twisted cannot exceed on this
machine at this moment, to judge the receive targets against.  It is not a test of
mailsys.

    python3 bench/twisted_floor.py [--cases 4k-20 4k-20-reuse] [--runs 3] [--processes 1 2]
                                   [--messages N] [--json FILE]
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the responder (runs in its own process) --------------------------------------------------

def serve(fd):
    from twisted.internet import protocol, reactor

    class Responder(protocol.Protocol):
        """Replies to commands by their first four bytes; DATA bodies are skipped."""

        def connectionMade(self):
            self.buf = b""
            self.data = False
            self.transport.write(b"220 floor ESMTP\r\n")

        def dataReceived(self, chunk):
            buf = self.buf + chunk
            out = []
            while True:
                if self.data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        self.buf = buf[-4:]
                        break
                    buf = buf[end + 5:]
                    self.data = False
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                eol = buf.find(b"\r\n")
                if eol < 0:
                    self.buf = buf
                    break
                verb = buf[:4].upper()
                buf = buf[eol + 2:]
                if verb == b"DATA":
                    self.data = True
                    buf = b"\r\n" + buf      # the marker may follow at once
                    out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif verb == b"QUIT":
                    out.append(b"221 2.0.0 Bye\r\n")
                    self.transport.write(b"".join(out))
                    self.transport.loseConnection()
                    return
                elif verb == b"EHLO":
                    out.append(b"250-floor\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                else:
                    out.append(b"250 2.0.0 Ok\r\n")
            if out:
                self.transport.write(b"".join(out))

    factory = protocol.Factory.forProtocol(Responder)
    reactor.adoptStreamPort(fd, socket.AF_INET, factory)
    reactor.run()


# -- the driver -------------------------------------------------------------------------------

def main():
    sys.path.insert(0, HERE)
    import receive as R

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=["4k-20"], choices=sorted(R.CASES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--messages", type=int)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.serve_fd is not None:
        return serve(args.serve_fd)

    results = []
    for name in args.cases:
        size, sessions, count, reuse, _, meaning = R.CASES[name]
        case = dict(name=name, size=size, sessions=sessions, reuse=reuse,
                    messages=args.messages or count)
        R.say(f"case {name}: {meaning}, {case['messages']} messages")
        sink = R.Sink(None, False)
        sink.start_case(case)
        try:
            for run in range(1, args.runs + 1):
                for n in args.processes:
                    results.append(dict(case=name, system=f"twisted x{n}", run=run,
                                        **_run_floor(R, case, n)))
                    R.say(f"  run {run}  twisted x{n:<3} {results[-1]['msgs_per_s']:9.1f} msg/s  "
                          f"server CPU {results[-1]['server_cpu_pct']:.0f}%  "
                          f"client CPU {results[-1]['client_cpu_pct']:.0f}%")
                argv = R.smtp_source_argv(case, sink.port, R.SINK_RCPT)
                cpu0 = sink.cpu()
                _, el, ccpu = R.run_source(argv, R.source_timeout(case))
                results.append(dict(case=name, system="smtp-sink", run=run,
                                    msgs_per_s=case["messages"] / el,
                                    server_cpu_pct=100 * (sink.cpu() - cpu0) / el,
                                    client_cpu_pct=100 * ccpu / el))
                R.say(f"  run {run}  smtp-sink     {results[-1]['msgs_per_s']:9.1f} msg/s  "
                      f"server CPU {results[-1]['server_cpu_pct']:.0f}%  "
                      f"client CPU {results[-1]['client_cpu_pct']:.0f}%")
        finally:
            sink.stop_case()
    R.say("\nmedians:")
    summary = {}
    for key in sorted({(r["case"], r["system"]) for r in results}):
        rs = [r["msgs_per_s"] for r in results if (r["case"], r["system"]) == key]
        summary[" ".join(key)] = statistics.median(rs)
        R.say(f"  {key[0]:<12} {key[1]:<12} {statistics.median(rs):9.1f} msg/s  "
              f"({min(rs):.0f}..{max(rs):.0f}, {len(rs)} runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, results=results, summary=summary), f, indent=1)


def _run_floor(R, case, processes):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-fd", str(lsock.fileno())],
                              pass_fds=[lsock.fileno()], start_new_session=True)
             for _ in range(processes)]
    lsock.close()
    try:
        R.wait_port(port, procs[0], what="the Twisted responder")
        time.sleep(0.5)                       # every copy in its reactor loop
        R.run_source(R.smtp_source_argv(case, port, R.SINK_RCPT, messages=2 * case["sessions"]), 60)
        cpu0 = sum(R.tree_cpu(p.pid) for p in procs)
        _, el, ccpu = R.run_source(R.smtp_source_argv(case, port, R.SINK_RCPT), R.source_timeout(case))
        cpu = sum(R.tree_cpu(p.pid) for p in procs) - cpu0
        return dict(msgs_per_s=case["messages"] / el, server_cpu_pct=100 * cpu / el,
                    client_cpu_pct=100 * ccpu / el)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
