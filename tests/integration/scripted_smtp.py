"""A small scriptable SMTP server on 127.0.0.1 for the remote-delivery failure paths.

It runs in a thread of the test process and answers each stage with the reply
the test chose (``replies={"RCPT": "550 5.1.1 no such user"}``; stages:
``greeting``, ``EHLO``, ``MAIL``, ``RCPT``, ``DATA``, ``END`` for the reply after
the message), the default being a plain, successful ESMTP server.  Every
command line is recorded in :attr:`commands`; every message received in
:attr:`messages` as ``(sender, [recipients], bytes)``.
"""
from __future__ import annotations

import socketserver
import threading

from tests.integration.harness import LOOPBACK, free_port

DEFAULTS = {
    "greeting": "220 scripted.test ESMTP",
    "EHLO": ["250-scripted.test", "250-PIPELINING", "250-8BITMIME", "250-SIZE 10000000",
             "250 ENHANCEDSTATUSCODES"],
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "END": "250 2.0.0 Ok: queued as SCRIPTED1",
    "RSET": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
}


class ScriptedSMTP:
    def __init__(self, replies=None):
        self.replies = dict(DEFAULTS, **(replies or {}))
        self.port = free_port()
        self.commands = []
        self.messages = []
        self.connections = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def say(self, stage):
                reply = outer.replies[stage]
                lines = reply if isinstance(reply, list) else [reply]
                self.wfile.write("".join(f"{line}\r\n" for line in lines).encode())
                self.wfile.flush()

            def handle(self):
                with outer._lock:
                    outer.connections += 1
                self.say("greeting")
                if not outer.replies["greeting"].startswith("2"):
                    return
                sender, rcpts = None, []
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    with outer._lock:
                        outer.commands.append(text)
                    verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        self.say("EHLO")
                    elif verb == "MAIL":
                        sender, rcpts = text, []
                        self.say("MAIL")
                    elif verb == "RCPT":
                        if outer.replies["RCPT"].startswith("2"):
                            rcpts.append(text)
                        self.say("RCPT")
                    elif verb == "DATA":
                        self.say("DATA")
                        if not outer.replies["DATA"].startswith("3"):
                            continue
                        data = []
                        while True:
                            chunk = self.rfile.readline()
                            if not chunk or chunk == b".\r\n":
                                break
                            data.append(chunk[1:] if chunk.startswith(b".") else chunk)
                        with outer._lock:
                            outer.messages.append((sender, rcpts, b"".join(data)))
                        self.say("END")
                    elif verb == "RSET":
                        self.say("RSET")
                    elif verb == "QUIT":
                        self.say("QUIT")
                        return
                    else:
                        self.wfile.write(b"502 5.5.2 not implemented\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((LOOPBACK, self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
