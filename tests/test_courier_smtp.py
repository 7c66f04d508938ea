"""The SMTP client protocol on StringTransport and task.Clock: every stage's
failure, PIPELINING, STARTTLS (and the discard of injected bytes), SIZE,
8BITMIME downgrade, SMTPUTF8, DSN parameters, timeouts, HELO fallback."""
import base64
import email
import email.policy

from hypothesis import given, settings, strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailsys.couriers import smtp as smtp_mod
from mailsys.couriers.downgrade import downgrade
from mailsys.couriers.lmtp import stuffed_chunks
from mailsys.couriers.smtp import RETRY, Refusal, SMTPClientProtocol, TLSPolicy, Transaction
from mailsys.delivery import Delivered, PermFail, TempFail
from mailsys.smtp.reply import Reply

RELAY = "mx.remote.test[127.0.0.1]:25"
MSG = b"Subject: hi\r\n\r\nbody\r\n"
EHLO_FULL = (b"250-mx.remote.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
             b"250-SMTPUTF8\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_PLAIN = b"250-mx.remote.test\r\n250 ENHANCEDSTATUSCODES\r\n"


class TLSTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.tls_started = None

    def startTLS(self, options):
        self.tls_started = options


def unstuff(wire):
    """The message from the bytes after 354, up to the terminating dot line."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class Session:
    def __init__(self, tls=None, auth=None, transport=None, **kw):
        self.clock = task.Clock()
        self.proto = SMTPClientProtocol("mx.mailsys.test", RELAY, clock=self.clock, tls=tls,
                                        auth=auth, **kw)
        self.tr = transport or StringTransport()
        self.proto.makeConnection(self.tr)
        self.ready = []
        self.proto.ready.addCallback(self.ready.append)

    def wire(self):
        out = self.tr.value()
        self.tr.clear()
        return out

    def feed(self, data):
        self.proto.dataReceived(data)

    def up(self, ehlo=EHLO_FULL):
        self.feed(b"220 mx.remote.test ESMTP\r\n")
        assert self.wire() == b"EHLO mx.mailsys.test\r\n"
        self.feed(ehlo)
        assert self.ready == [True], self.ready
        return self

    def send(self, recipients=("a@remote.test",), message=MSG, sender="s@example.com",
             params=None, opts=None):
        out = []
        rcpts = [(r, (opts or {}).get(r, {})) for r in recipients]
        self.proto.send(Transaction(sender, rcpts, message, params)).addCallback(out.append)
        return out


class GreetingAndHello(unittest.TestCase):
    def test_4xx_greeting_refuses_and_tries_next(self):
        s = Session()
        s.feed(b"421 4.3.2 busy, try later\r\n")
        [r] = s.ready
        self.assertIsInstance(r, Refusal)
        self.assertTrue(r.try_next)
        self.assertEqual(r.outcome, TempFail(Reply(421, "4.3.2", "busy, try later")))
        self.assertEqual(r.outcome.relay, RELAY)

    def test_5xx_greeting_is_skipped_for_the_next_mx(self):
        """Postfix's smtp_skip_5xx_greeting = yes: the next MX may take the
        mail; with none left it waits for a retry instead of bouncing."""
        s = Session()
        s.feed(b"554 5.7.1 no mail from you\r\n")
        [r] = s.ready
        self.assertTrue(r.try_next)
        self.assertEqual(r.outcome, TempFail(Reply(554, "5.7.1", "no mail from you")))
        self.assertEqual(r.outcome.relay, RELAY)
        self.assertEqual(s.wire(), b"QUIT\r\n")

    def test_helo_fallback(self):
        s = Session()
        s.feed(b"220 old.remote.test SMTP\r\n")
        self.assertEqual(s.wire(), b"EHLO mx.mailsys.test\r\n")
        s.feed(b"500 command not recognized\r\n")
        self.assertEqual(s.wire(), b"HELO mx.mailsys.test\r\n")
        s.feed(b"250 old.remote.test\r\n")
        self.assertEqual(s.ready, [True])
        self.assertEqual(s.proto.extensions, {})
        out = s.send()
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com>\r\n")
        s.feed(b"250 ok\r\n")
        self.assertEqual(s.wire(), b"RCPT TO:<a@remote.test>\r\n")
        s.feed(b"250 ok\r\n")
        self.assertEqual(s.wire(), b"DATA\r\n")
        s.feed(b"354 go\r\n")
        self.assertEqual(s.wire(), MSG + b".\r\n")
        s.feed(b"250 queued as X\r\n")
        self.assertEqual(out, [[Delivered(Reply(250, "", "queued as X"))]])
        self.assertEqual(out[0][0].relay, RELAY)

    def test_4xx_ehlo_tries_next(self):
        s = Session()
        s.feed(b"220 x ESMTP\r\n")
        s.wire()
        s.feed(b"451 4.3.0 try later\r\n")
        [r] = s.ready
        self.assertTrue(r.try_next)
        self.assertEqual(r.outcome, TempFail(Reply(451, "4.3.0", "try later")))

    def test_multiline_greeting(self):
        s = Session()
        s.feed(b"220-mx.remote.test ESMTP\r\n220 welcome\r\n")
        self.assertEqual(s.wire(), b"EHLO mx.mailsys.test\r\n")


class Transactions(unittest.TestCase):
    def test_pipelined_envelope_per_recipient_results(self):
        s = Session().up()
        out = s.send(["a@remote.test", "b@remote.test", "c@remote.test"])
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com> SIZE=21\r\n"
                                   b"RCPT TO:<a@remote.test>\r\nRCPT TO:<b@remote.test>\r\n"
                                   b"RCPT TO:<c@remote.test>\r\n")
        s.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <b@remote.test>: no such user\r\n"
               b"450 4.2.0 <c@remote.test>: greylisted\r\n")
        self.assertEqual(s.wire(), b"DATA\r\n")
        s.feed(b"354 go ahead\r\n")
        self.assertEqual(s.wire(), MSG + b".\r\n")
        s.feed(b"250 2.0.0 Ok: queued as ABC\r\n")
        self.assertEqual(out, [[Delivered(Reply(250, "2.0.0", "Ok: queued as ABC")),
                                PermFail(Reply(550, "5.1.1", "<b@remote.test>: no such user")),
                                TempFail(Reply(450, "4.2.0", "<c@remote.test>: greylisted"))]])
        self.assertTrue(all(o.relay == RELAY for o in out[0]))

    def test_mail_refused_pipelined(self):
        s = Session().up()
        out = s.send(["a@remote.test", "b@remote.test"])
        s.wire()
        s.feed(b"553 5.7.1 sender rejected\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n")
        self.assertEqual(s.wire(), b"")
        self.assertEqual(out, [[PermFail(Reply(553, "5.7.1", "sender rejected"))] * 2])

    def test_all_rcpts_refused_no_data(self):
        s = Session().up()
        out = s.send(["a@remote.test"])
        s.wire()
        s.feed(b"250 2.1.0 ok\r\n550 5.1.1 unknown\r\n")
        self.assertEqual(s.wire(), b"")
        self.assertEqual(out, [[PermFail(Reply(550, "5.1.1", "unknown"))]])

    def test_data_refused_5xx_fails_all_accepted(self):
        s = Session().up()
        out = s.send(["a@remote.test", "b@remote.test"])
        s.wire()
        s.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n")
        s.feed(b"554 5.5.1 no valid recipients\r\n")
        self.assertEqual(out, [[PermFail(Reply(554, "5.5.1", "no valid recipients"))] * 2])

    def test_final_reply_5xx(self):
        s = Session().up()
        out = s.send()
        s.wire()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.feed(b"550 5.7.1 content rejected\r\n")
        self.assertEqual(out, [[PermFail(Reply(550, "5.7.1", "content rejected"))]])

    def test_connection_lost_after_data_is_tempfail(self):
        s = Session().up()
        out = s.send(["a@remote.test", "b@remote.test"])
        s.wire()
        s.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        s.proto.connectionLost(None)
        self.assertEqual(out, [[
            TempFail(Reply(451, "4.4.2", f"lost connection with {RELAY} while waiting for the "
                                         "reply to the end of data")),
            PermFail(Reply(550, "5.1.1", "no"))]])

    def test_without_pipelining_one_command_at_a_time(self):
        s = Session().up(EHLO_PLAIN)
        out = s.send(["a@remote.test", "b@remote.test"])
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com>\r\n")
        s.feed(b"250 ok\r\n")
        self.assertEqual(s.wire(), b"RCPT TO:<a@remote.test>\r\n")
        s.feed(b"250 ok\r\n")
        self.assertEqual(s.wire(), b"RCPT TO:<b@remote.test>\r\n")
        s.feed(b"550 5.1.1 no\r\n")
        self.assertEqual(s.wire(), b"DATA\r\n")
        s.feed(b"354 go\r\n")
        s.wire()
        s.feed(b"250 2.0.0 ok\r\n")
        self.assertEqual([type(o) for o in out[0]], [Delivered, PermFail])

    def test_second_transaction_sends_rset(self):
        s = Session().up()
        first = s.send()
        s.wire()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.wire()
        s.feed(b"250 2.0.0 one\r\n")
        self.assertEqual(first, [[Delivered(Reply(250, "2.0.0", "one"))]])
        second = s.send()
        self.assertEqual(s.wire(), b"RSET\r\n")
        s.feed(b"250 2.0.0 ok\r\n")
        self.assertTrue(s.wire().startswith(b"MAIL FROM:"))
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.wire()
        s.feed(b"250 2.0.0 two\r\n")
        self.assertEqual(second, [[Delivered(Reply(250, "2.0.0", "two"))]])
        self.assertEqual(s.proto.transactions, 2)

    def test_reused_session_lost_at_rset_asks_for_retry(self):
        s = Session().up()
        s.send()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        out = s.send()
        s.proto.connectionLost(None)
        self.assertEqual(out, [RETRY])

    def test_421_mid_transaction(self):
        s = Session().up()
        out = s.send()
        s.feed(b"421 4.7.0 shutting down\r\n")
        self.assertEqual(out, [[TempFail(Reply(421, "4.7.0", "shutting down"))]])
        self.assertTrue(s.tr.disconnecting)

    def test_garbage_reply_is_tempfail(self):
        s = Session().up()
        out = s.send()
        s.feed(b"hello there\r\n")
        self.assertIsInstance(out[0][0], TempFail)
        self.assertEqual(out[0][0].reply.status, "4.5.0")


class Extensions(unittest.TestCase):
    def test_size_exceeded_is_permanent_before_mail(self):
        s = Session().up()
        out = s.send(message=b"x" * 998 + b"\r\n\r\n" + b"y\r\n")
        self.assertEqual(s.wire(), b"")
        self.assertEqual(out, [[PermFail(Reply(552, "5.3.4", (
            f"message size 1005 exceeds size limit 1000 of server {RELAY}")))]])

    def test_flagged_smtputf8_but_ascii_goes_without_the_flag(self):
        """RFC 6531 3.4: nothing in the envelope or header needs it, so a server
        without SMTPUTF8 gets the message (its 8-bit body goes as 8BITMIME)."""
        s = Session().up(EHLO_PLAIN)
        out = s.send(params={"smtputf8": True})
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com>\r\n")     # no SMTPUTF8 asked for
        self.assertEqual(out, [])

    def test_flagged_smtputf8_with_a_utf8_header_is_refused(self):
        s = Session().up(EHLO_PLAIN)
        out = s.send(params={"smtputf8": True},
                     message="Subject: Grüße\r\n\r\nhi\r\n".encode())
        self.assertEqual(s.wire(), b"")
        self.assertEqual(out, [[PermFail(Reply(553, "5.6.7", (
            f"SMTPUTF8 is required, but was not offered by host {RELAY}")))]])

    def test_utf8_address_without_smtputf8(self):
        s = Session().up(EHLO_PLAIN)
        out = s.send(["jörg@remote.test"])
        self.assertEqual(out[0][0].reply.status, "5.6.7")

    def test_smtputf8_offered(self):
        s = Session().up()
        s.send(["jörg@remote.test"], params={"smtputf8": True})
        self.assertEqual(s.wire(), "MAIL FROM:<s@example.com> SIZE=21 SMTPUTF8\r\n"
                                   "RCPT TO:<jörg@remote.test>\r\n".encode())

    def test_dsn_parameters_passed_on(self):
        s = Session().up()
        out = s.send(params={"ret": "HDRS", "envid": "id+1=2"},
                     opts={"a@remote.test": {"orcpt": ("rfc822", "alias@example.com"),
                                             "notify": ["SUCCESS", "FAILURE"]}})
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com> SIZE=21 RET=HDRS ENVID=id+2B1+3D2\r\n"
                                   b"RCPT TO:<a@remote.test> NOTIFY=SUCCESS,FAILURE "
                                   b"ORCPT=rfc822;alias@example.com\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        # The server has the NOTIFY request and reports success itself (RFC 3461 5.2).
        self.assertIsInstance(out[0][0], Delivered)
        self.assertIs(out[0][0].action, smtp_mod.PASSED_ON)

    def test_dsn_parameters_dropped_without_dsn(self):
        s = Session().up(b"250-x\r\n250 PIPELINING\r\n")
        out = s.send(params={"ret": "HDRS", "envid": "x"},
                     opts={"a@remote.test": {"orcpt": ("rfc822", "alias@example.com")}})
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@remote.test>\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        # No DSN there: a success notice, if asked for, is ours and says "relayed".
        self.assertIsInstance(out[0][0], Delivered)
        self.assertEqual(out[0][0].action, "relayed")

    def test_8bit_with_8bitmime(self):
        s = Session().up()
        body = "Subject: x\r\n\r\nhällo\r\n".encode()
        s.send(message=body)
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com> SIZE=%d BODY=8BITMIME\r\n" % len(body)
                         +
                                   b"RCPT TO:<a@remote.test>\r\n")

    def test_8bit_downgraded_without_8bitmime(self):
        s = Session().up(b"250-x\r\n250 PIPELINING\r\n")
        body = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n" \
               "Content-Transfer-Encoding: 8bit\r\n\r\nhällo\r\n.dot\r\n".encode()
        out = s.send(message=body)
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@remote.test>\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n")
        wire = s.wire()
        self.assertEqual(wire, b"DATA\r\n")
        s.feed(b"354 go\r\n")
        wire = s.wire()
        self.assertEqual(wire, b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
                               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                               b"h=C3=A4llo\r\n..dot\r\n.\r\n")
        self.assertTrue(wire.isascii())
        s.feed(b"250 ok\r\n")
        self.assertIsInstance(out[0][0], Delivered)

    def test_8bit_header_cannot_be_downgraded(self):
        s = Session().up(b"250-x\r\n250 PIPELINING\r\n")
        out = s.send(message="Subject: hällo\r\n\r\nhällo\r\n".encode())
        self.assertEqual(s.wire(), b"")
        self.assertEqual(out[0][0].reply.code, 554)
        self.assertEqual(out[0][0].reply.status, "5.6.3")
        self.assertIsInstance(out[0][0], PermFail)

    def test_bare_lf_in_body_goes_out_as_crlf(self):
        s = Session().up()
        s.send(message=b"Subject: x\n\nline\rtwo\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        wire = s.wire().split(b"RCPT TO:<a@remote.test>\r\nDATA\r\n")[-1]
        wire = s.tr.value() or wire
        self.assertNotIn(b"\n", wire.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", wire.replace(b"\r\n", b""))

    def test_command_with_crlf_refused(self):
        s = Session().up()
        with self.assertRaises(ValueError):
            s.proto._command("MAIL FROM:<a\r\nRSET>")


class StartTLS(unittest.TestCase):
    def test_may_starttls_then_ehlo_again(self):
        tr = TLSTransport()
        s = Session(tls=TLSPolicy("may"), transport=tr)
        s.feed(b"220 x ESMTP\r\n")
        s.wire()
        s.feed(b"250-x\r\n250-STARTTLS\r\n250 PIPELINING\r\n")
        self.assertEqual(s.wire(), b"STARTTLS\r\n")
        self.assertEqual(s.ready, [])
        s.feed(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIsNotNone(tr.tls_started)
        self.assertEqual(s.wire(), b"EHLO mx.mailsys.test\r\n")
        s.feed(b"250-x\r\n250 PIPELINING\r\n")
        self.assertEqual(s.ready, [True])
        self.assertTrue(s.proto.secure)
        self.assertFalse(s.proto.verified)

    def test_bytes_after_the_220_are_discarded(self):
        tr = TLSTransport()
        s = Session(tls=TLSPolicy("may"), transport=tr)
        s.feed(b"220 x ESMTP\r\n")
        s.wire()
        s.feed(b"250-x\r\n250 STARTTLS\r\n")
        s.wire()
        # An attacker in the path appends a fake EHLO reply to the 220.
        s.feed(b"220 2.0.0 go\r\n250-evil\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(s.wire(), b"EHLO mx.mailsys.test\r\n")
        self.assertEqual(s.ready, [])
        s.feed(b"250-x\r\n250 SIZE 10\r\n")
        self.assertEqual(s.ready, [True])
        self.assertEqual(s.proto.extensions, {"SIZE": "10"})

    def test_partial_line_after_220_is_discarded(self):
        tr = TLSTransport()
        s = Session(tls=TLSPolicy("may"), transport=tr)
        s.feed(b"220 x ESMTP\r\n250-x\r\n250 STARTTLS\r\n")
        s.wire()
        s.feed(b"220 2.0.0 go\r\n250-ev")
        s.feed(b"250 real\r\n")
        self.assertEqual(s.ready, [True])

    def test_may_falls_back_to_plaintext_when_not_offered(self):
        s = Session(tls=TLSPolicy("may"), transport=TLSTransport())
        s.up(EHLO_PLAIN)
        self.assertFalse(s.proto.secure)

    def test_may_goes_on_when_starttls_refused(self):
        s = Session(tls=TLSPolicy("may"), transport=TLSTransport())
        s.feed(b"220 x\r\n250-x\r\n250 STARTTLS\r\n")
        s.wire()
        s.feed(b"454 4.7.0 TLS not available\r\n")
        self.assertEqual(s.ready, [True])

    def test_encrypt_requires_starttls(self):
        s = Session(tls=TLSPolicy("encrypt"), transport=TLSTransport())
        s.feed(b"220 x\r\n")
        s.wire()
        s.feed(EHLO_PLAIN)
        [r] = s.ready
        self.assertEqual(r.outcome, TempFail(Reply(451, "4.7.4", (
            f"TLS is required, but was not offered by host {RELAY}"))))
        self.assertEqual(s.wire(), b"QUIT\r\n")

    def test_handshake_failure_under_may_asks_for_plaintext(self):
        s = Session(tls=TLSPolicy("may"), transport=TLSTransport())
        s.feed(b"220 x\r\n250-x\r\n250 STARTTLS\r\n")
        s.feed(b"220 go\r\n")
        s.proto.connectionLost(None)
        [r] = s.ready
        self.assertTrue(r.plaintext)
        self.assertEqual(r.outcome.reply.status, "4.7.5")

    def test_none_never_starts_tls(self):
        tr = TLSTransport()
        s = Session(tls=TLSPolicy("none"), transport=tr)
        s.up(b"250-x\r\n250 STARTTLS\r\n")
        self.assertIsNone(tr.tls_started)

    def test_auth_plain_after_verified_tls(self):
        tr = TLSTransport()
        s = Session(tls=TLSPolicy("encrypt", trust_root=object()), auth=("joe", "sécret"),
                    transport=tr)
        s.proto.tls.options = lambda name: ("options for", name)
        s.feed(b"220 x\r\n250-x\r\n250 STARTTLS\r\n")
        s.feed(b"220 go\r\n")
        self.assertEqual(tr.tls_started, ("options for", "mx.remote.test"))
        s.wire()
        s.feed(b"250-x\r\n250 AUTH LOGIN PLAIN\r\n")
        token = base64.b64encode("\0joe\0sécret".encode()).decode()
        self.assertEqual(s.wire(), f"AUTH PLAIN {token}\r\n".encode())
        s.feed(b"235 2.7.0 ok\r\n")
        self.assertEqual(s.ready, [True])

    def test_auth_login(self):
        s = Session(tls=TLSPolicy("encrypt"), auth=("joe", "pw"), transport=TLSTransport())
        s.proto.tls.options = lambda name: None
        s.feed(b"220 x\r\n250-x\r\n250 STARTTLS\r\n220 go\r\n")
        s.wire()
        s.feed(b"250-x\r\n250 AUTH LOGIN\r\n")
        self.assertEqual(s.wire(), b"AUTH LOGIN\r\n")
        s.feed(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.wire(), b"am9l\r\n")
        s.feed(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.wire(), b"cHc=\r\n")
        s.feed(b"235 2.7.0 ok\r\n")
        self.assertEqual(s.ready, [True])

    def test_auth_refused_is_tempfail(self):
        s = Session(tls=TLSPolicy("encrypt"), auth=("joe", "pw"), transport=TLSTransport())
        s.proto.tls.options = lambda name: None
        s.feed(b"220 x\r\n250-x\r\n250 STARTTLS\r\n220 go\r\n")
        s.feed(b"250-x\r\n250 AUTH PLAIN\r\n")
        s.feed(b"535 5.7.8 bad credentials\r\n")
        [r] = s.ready
        self.assertEqual(r.outcome, TempFail(Reply(451, "4.7.0", (
            f"SASL authentication failed with {RELAY}: server said: 535 5.7.8 bad credentials"))))

    def test_no_credentials_without_verified_tls(self):
        s = Session(tls=TLSPolicy("may"), auth=("joe", "pw"), transport=TLSTransport())
        s.feed(b"220 x\r\n250-x\r\n250 AUTH PLAIN\r\n")
        [r] = s.ready
        self.assertEqual(r.outcome.reply.status, "4.7.0")
        self.assertNotIn(b"AUTH", s.wire())


class Timeouts(unittest.TestCase):
    def check(self, s, seconds, what):
        s.clock.advance(seconds - 1)
        self.assertFalse(s.tr.disconnecting)
        s.clock.advance(1)
        self.assertTrue(s.tr.disconnecting)

    def test_greeting_timeout(self):
        s = Session()
        self.check(s, smtp_mod.GREETING_TIMEOUT, "greeting")
        [r] = s.ready
        self.assertEqual(r.outcome, TempFail(Reply(451, "4.4.2", (
            f"conversation with {RELAY} timed out while receiving the greeting"))))

    def _timeout_at(self, replies, seconds, what):
        s = Session().up()
        out = s.send()
        s.feed(replies)
        self.check(s, seconds, what)
        self.assertEqual(out, [[TempFail(Reply(451, "4.4.2", (
            f"conversation with {RELAY} timed out while waiting for the reply to {what}")))]])

    def test_mail_timeout(self):
        self._timeout_at(b"", smtp_mod.MAIL_TIMEOUT, "MAIL FROM")

    def test_rcpt_timeout(self):
        self._timeout_at(b"250 ok\r\n", smtp_mod.RCPT_TIMEOUT, "RCPT TO")

    def test_data_init_timeout(self):
        self._timeout_at(b"250 ok\r\n250 ok\r\n", smtp_mod.DATA_INIT_TIMEOUT, "DATA")

    def test_data_termination_timeout(self):
        s = Session().up()
        out = s.send()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.check(s, smtp_mod.DATA_END_TIMEOUT, "end")
        self.assertEqual(out[0][0].reply.text,
                         f"conversation with {RELAY} timed out while waiting for the reply to "
                         "end of data")

    def test_data_block_timeout(self):
        s = Session(chunk_size=16).up(EHLO_PLAIN)
        out = s.send(message=b"x" * 100 + b"\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsNotNone(s.tr.producer)   # the transport never asks for more
        self.check(s, smtp_mod.DATA_BLOCK_TIMEOUT, "body")
        self.assertEqual(out[0][0].reply.text,
                         f"conversation with {RELAY} timed out while sending the message")

    def test_timeouts_are_rfc5321_values(self):
        self.assertEqual((smtp_mod.GREETING_TIMEOUT, smtp_mod.MAIL_TIMEOUT, smtp_mod.RCPT_TIMEOUT,
                          smtp_mod.DATA_INIT_TIMEOUT, smtp_mod.DATA_BLOCK_TIMEOUT,
                          smtp_mod.DATA_END_TIMEOUT), (300, 300, 300, 120, 180, 600))


# --- dot-stuffing on the wire, for every chunking ---------------------------------------

lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b"From x", b". ", b"x" * 7]),
                 max_size=12)


class DotStuffing(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(lines, st.integers(min_value=2, max_value=40), st.booleans())
    def test_wire_unstuffs_to_message(self, parts, size, final_crlf):
        message = b"\r\n".join(parts) + (b"\r\n" if final_crlf and parts else b"")
        wire = b"".join(stuffed_chunks(message, size))
        expected = message if (not message or message.endswith(b"\r\n")) else message + b"\r\n"
        if not message:
            self.assertEqual(wire, b".\r\n")
        else:
            self.assertEqual(unstuff(wire), expected)
            # every line on the wire is either the terminator or not a lone dot
            body_lines = wire[:-5].split(b"\r\n") if wire.endswith(b"\r\n.\r\n") else []
            self.assertNotIn(b".", body_lines)

    @settings(max_examples=200, deadline=None)
    @given(lines, st.integers(min_value=2, max_value=30))
    def test_through_the_protocol_with_a_dot_line_at_each_boundary(self, parts, size):
        message = b"\r\n".join(parts + [b""])
        # Put a "." line exactly at the chunk boundary, too.
        message = message[:size - 2].replace(b"\r", b"").replace(b"\n", b"") + b"\r\n.\r\n" + message
        s = Session(chunk_size=size).up(EHLO_PLAIN)
        out = s.send(message=message)
        s.feed(b"250 ok\r\n250 ok\r\n")
        s.wire()
        s.feed(b"354 go\r\n")
        while s.tr.producer is not None:
            s.tr.producer.resumeProducing()
        wire = s.wire()
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))
        self.assertEqual(unstuff(wire), message)
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)
        s.feed(b"250 ok\r\n")
        self.assertIsInstance(out[0][0], Delivered)


class Downgrade(unittest.TestCase):
    def test_multipart_each_8bit_text_part(self):
        msg = ("Subject: m\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
               "preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nä 1\r\n"
               "--b1\r\nContent-Type: text/plain\r\n\r\nascii\r\n"
               "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit"
               "\r\n\r\n\xff\r\n--b1--\r\n").encode("latin-1").replace("ä".encode("latin-1"),
                                                                        "ä".encode())
        out = downgrade(msg)
        self.assertTrue(out.isascii())
        parsed = email.message_from_bytes(out, policy=email.policy.default)
        parts = list(parsed.iter_parts())
        self.assertEqual(parts[0]["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(parts[0].get_content(), "ä 1")
        self.assertIsNone(parts[1]["Content-Transfer-Encoding"])
        self.assertEqual(parts[2]["Content-Transfer-Encoding"], "base64")
        self.assertEqual(parts[2].get_content(), b"\xff")
        self.assertIn(b"\r\nascii\r\n--b1\r\n", out)

    def test_impossible_cases(self):
        self.assertIsNone(downgrade("Subject: ä\r\n\r\nx\r\n".encode()))
        self.assertIsNone(downgrade(b"Content-Transfer-Encoding: binary\r\n\r\n\xff\r\n"))
        self.assertIsNone(downgrade(b"Content-Type: multipart/mixed\r\n\r\n\xff\r\n"))

    def test_ascii_unchanged(self):
        self.assertIs(downgrade(MSG), MSG)


def _too_long(message, limit):
    """The plain answer has_long_line must give: any line over ``limit`` octets."""
    return any(len(line) > limit for line in message.split(b"\r\n"))


class LongLines(unittest.TestCase):
    """A line over 998 octets is broken with CRLF SPACE before it goes out, as
    Postfix's smtp_line_length_limit does (RFC 5321 4.5.3.1.6)."""

    def test_limit_is_rfc_5322s(self):
        self.assertEqual(smtp_mod.MAX_LINE, 998)

    def test_lines_up_to_the_limit_go_as_they_are(self):
        for message in (b"", b"x" * 998, b"x" * 998 + b"\r\n", (b"y" * 998 + b"\r\n") * 5,
                        b"Subject: " + b"s" * 989 + b"\r\n\r\n" + b"b" * 998):
            self.assertFalse(smtp_mod.has_long_line(message))
            self.assertIs(smtp_mod.fold_long_lines(message), message)

    def test_one_octet_over(self):
        self.assertTrue(smtp_mod.has_long_line(b"x" * 999))
        self.assertEqual(smtp_mod.fold_long_lines(b"a" * 998 + b"b\r\n"),
                         b"a" * 998 + b"\r\n b\r\n")
        self.assertEqual(smtp_mod.fold_long_lines(b"ok\r\n" + b"a" * 999),
                         b"ok\r\n" + b"a" * 998 + b"\r\n a")

    def test_long_header_and_body_lines(self):
        subject = b"Subject: " + b"s" * 2100
        body = b"<html>" + b"h" * 5000 + b"</html>"
        message = b"From: a@b.test\r\n" + subject + b"\r\n\r\nfirst\r\n" + body + b"\r\nlast\r\n"
        out = smtp_mod.fold_long_lines(message)
        lines = out.split(b"\r\n")
        self.assertEqual(max(map(len, lines)), 998)
        self.assertEqual([len(line) for line in lines],
                         [14, 998, 998, 115, 0, 5, 998, 998, 998, 998, 998, 28, 4, 0])
        # Every inserted break is CRLF SPACE; taking them out gives the message back.
        self.assertEqual(out.replace(b"\r\n ", b""), message)
        # The header is one folded field, unchanged but for the spaces.
        parsed = email.message_from_bytes(out, policy=email.policy.compat32)
        self.assertEqual(parsed["Subject"].replace("\r\n ", ""), "s" * 2100)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=2500), max_size=8), st.booleans(),
           st.integers(min_value=2, max_value=60))
    def test_any_line_lengths(self, lengths, final_crlf, limit):
        parts = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
        message = b"\r\n".join(parts) + (b"\r\n" if final_crlf and parts else b"")
        self.assertEqual(smtp_mod.has_long_line(message, limit), _too_long(message, limit))
        out = smtp_mod.fold_long_lines(message, limit)
        self.assertFalse(_too_long(out, limit))
        # No line of the input starts with a space, so every one that does on the
        # way out is a continuation: joining them back gives the input.
        self.assertEqual(out.replace(b"\r\n ", b""), message)
        if not _too_long(message, limit):
            self.assertIs(out, message)

    def test_through_the_protocol(self):
        message = b"Subject: x\r\n\r\n" + b"." + b"d" * 1500 + b"\r\nend\r\n"
        s = Session().up(EHLO_PLAIN)
        out = s.send(message=message)
        s.feed(b"250 ok\r\n250 ok\r\n")
        s.wire()
        s.feed(b"354 go\r\n")
        wire = s.wire()
        # The leading dot is stuffed; the line is broken after 998 octets of the message.
        self.assertEqual(wire, b"Subject: x\r\n\r\n.." + b"d" * 997 + b"\r\n " + b"d" * 503
                         + b"\r\nend\r\n.\r\n")
        s.feed(b"250 ok\r\n")
        self.assertIsInstance(out[0][0], Delivered)

    def test_size_counts_the_folded_message(self):
        message = b"Subject: x\r\n\r\n" + b"z" * 1500 + b"\r\n"      # one break: 3 more octets
        s = Session().up(b"250-x\r\n250-PIPELINING\r\n250 SIZE 100000\r\n")
        s.send(message=message)
        self.assertEqual(s.wire(), b"MAIL FROM:<s@example.com> SIZE=%d\r\nRCPT TO:<a@remote.test>\r\n"
                         % (len(message) + 3))
        # ... and the server's limit is checked against that size, too.
        s = Session().up(b"250-x\r\n250-PIPELINING\r\n250 SIZE %d\r\n" % (len(message) + 2))
        out = s.send(message=message)
        self.assertEqual(s.wire(), b"")
        self.assertEqual((out[0][0].reply.code, out[0][0].reply.status), (552, "5.3.4"))
        self.assertIn(f"message size {len(message) + 3} exceeds", out[0][0].reply.text)

    def test_8bit_long_line_is_encoded_not_folded(self):
        """Without 8BITMIME the body is quoted-printable first, whose soft line
        breaks keep the text exact: no space is inserted into it."""
        text = "ä" * 1000
        message = ("Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n\r\n" + text + "\r\n").encode()
        s = Session().up(b"250-x\r\n250 PIPELINING\r\n")
        out = s.send(message=message)
        s.feed(b"250 ok\r\n250 ok\r\n")
        s.wire()
        s.feed(b"354 go\r\n")
        wire = s.wire()
        self.assertLessEqual(max(map(len, wire.split(b"\r\n"))), 76)
        parsed = email.message_from_bytes(unstuff(wire), policy=email.policy.default)
        self.assertEqual(parsed.get_content(), text + "\r\n")
        s.feed(b"250 ok\r\n")
        self.assertIsInstance(out[0][0], Delivered)
