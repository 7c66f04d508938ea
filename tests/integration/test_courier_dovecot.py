"""Our LMTP courier against a real, independent LMTP server: Dovecot's, which
offers PIPELINING and CHUNKING, so the courier speaks BDAT to it (the envelope,
``BDAT <size> LAST`` and the message in one write; a message over one chunk
through the producer).  Dovecot stores what it got in Maildir; each file must
end with the message exactly (Dovecot adds Return-Path, Delivered-To and its
Received header in front and keeps LF line ends)."""
import socket

import pytest

from tests.integration.harness import DovecotPeer, maildir_files
from tests.integration.test_courier_lmtp import message, run_courier

pytestmark = pytest.mark.integration


def test_courier_delivers_to_dovecot_by_bdat(tmp_path):
    dots = message("dovecot-dots", b".one\r\n..two\r\n.\r\nend\r\n")
    lines = [b".leading dot %d and some text to fill the line\r\n" % n for n in range(14000)]
    big = message("dovecot-big", b"".join(lines))
    assert len(big) > 2 * 256 * 1024       # more than two of the courier's chunks
    mail_root = tmp_path / "mail"
    dovecot = DovecotPeer(tmp_path / "dovecot", mail_root, lmtp=True)
    dovecot.start()
    try:
        # The courier takes BDAT only from a server that offers both: check this one does.
        with socket.create_connection(("127.0.0.1", dovecot.lmtp_port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"LHLO probe.example\r\n")
            capabilities = set()
            while True:
                line = f.readline()
                assert line.startswith(b"250"), line
                capabilities.add(line[4:].strip().split(b" ")[0].upper())
                if line[3:4] == b" ":
                    break
            s.sendall(b"QUIT\r\n")
        assert {b"PIPELINING", b"CHUNKING"} <= capabilities
        outcomes = run_courier(tmp_path, f"tcp:{dovecot.lmtp_port}:interface=127.0.0.1", [
            {"sender": "alice@example.org", "rcpts": ["joe@example.com", "ann@example.com"],
             "message": dots},
            {"sender": "alice@example.org", "rcpts": ["joe@example.com"], "message": big},
        ])
        log = dovecot.log_text()
    finally:
        dovecot.stop()
    assert [[o[:3] for o in per] for per in outcomes] == [
        [["Delivered", 250, "2.0.0"], ["Delivered", 250, "2.0.0"]], [["Delivered", 250, "2.0.0"]]]
    assert all("Saved" in o[3] for per in outcomes for o in per), outcomes
    joe = sorted(maildir_files(mail_root / "example.com" / "joe" / "Maildir").values(), key=len)
    ann = list(maildir_files(mail_root / "example.com" / "ann" / "Maildir").values())
    assert len(joe) == 2 and len(ann) == 1
    for stored, sent in ((joe[0], dots), (joe[1], big), (ann[0], dots)):
        assert stored.startswith(b"Return-Path: <alice@example.org>\n")
        assert stored.endswith(b"\n" + sent.replace(b"\r\n", b"\n"))
    assert " error" not in log.lower(), log
