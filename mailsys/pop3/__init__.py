"""POP3 (RFC 1939) on ``listen.pop3`` (STLS) and ``listen.pop3s`` (implicit TLS)
over the same accounts and mailboxes as the MDA.  See docs/pop3.rst.

``server``   the wire: a state machine that asks a backend
``service``  the backend: accounts, throttling, mailbox opening; the factory
``mailbox``  Maildir and mbox read side, the one-session lock, the QUIT commit
``wire``     stored bytes to CRLF, dot-stuffed, mboxrd-unquoted lines
"""


def listeners(host):
    """``[(role, endpoint, factory)]`` for every configured POP3 endpoint of ``host``
    (a mailsys.tap.MailHost); pop3s factories are wrapped in implicit TLS."""
    from mailsys.pop3.service import POP3Factory
    from mailsys.receive import implicit_tls

    out = []
    for role in ("pop3", "pop3s"):
        for endpoint in getattr(host.config.listen, role):
            factory = POP3Factory(host, role)
            if role == "pop3s":
                factory = implicit_tls(factory, host.tls)
            out.append((role, endpoint, factory))
    return out
