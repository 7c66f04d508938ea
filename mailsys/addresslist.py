"""RFC 5322 address lists, as programs write them in header fields and on the
sendmail command line: find the addresses in them, and give a bare local part
(``root``) a domain without changing one other character of the field.

``mailsys sendmail`` needs both.  Postfix's sendmail parses every recipient
argument as an address list (``'Joe <joe@example.com>, ann'``), and Postfix's
cleanup appends ``@myorigin`` to the unqualified addresses in the header of
locally submitted mail, so that cron's ``From: root (Cron Daemon)`` leaves the
host as ``From: root@example.com (Cron Daemon)`` instead of an address that
receiving providers refuse.  Mail received over SMTP is never rewritten.

The parser is small and strict on purpose: display names, comments, quoted
strings, folding and route addresses are kept exactly as written, and a field
it cannot read with certainty (an unclosed quote, two words where an address
should be, ...) raises :class:`Unparsed`, so the caller keeps the field as it
is instead of guessing what was meant.  Addresses inside a group
(``Friends: a, b;``) are found but never rewritten.
"""
from typing import NamedTuple

WS, COMMENT, QUOTED, LITERAL, ATOM = "ws", "comment", "quoted", "literal", "atom"
_SPECIALS = "<>@,;:."
_STOP = " \t\r\n()\"[]\\" + _SPECIALS


class Unparsed(ValueError):
    """The text is no address list that can be read without guessing."""


class Address(NamedTuple):
    """One mailbox of a list: ``spec`` is its addr-spec with white space and
    comments removed (``""`` for ``<>``); ``end`` is the offset in the text
    just after the addr-spec's last character, where a domain would go."""
    spec: str
    end: int
    bare: bool          # no "@domain"
    in_group: bool
    routed: bool        # <@relay:user@domain>, obsolete source route


def _closing(text, i, opening, closing, nests):
    """Offset after the ``closing`` character matching ``text[i]``, honouring
    quoted pairs (and nesting, for comments)."""
    depth, j, n = 1, i + 1, len(text)
    while True:
        if j >= n:
            raise Unparsed(f"unclosed {opening}")
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == closing:
            depth -= 1
            if depth == 0:
                return j + 1
        elif c == opening:
            if not nests:
                raise Unparsed(f"{opening} inside {opening}")
            depth += 1
        j += 1


def tokens(text):
    """``[(kind, start, end)]`` covering all of ``text``: white space,
    comments, quoted strings, domain literals, atoms and one-character
    specials (the kind is the character itself)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            j = i
            while j < n and text[j] in " \t\r\n":
                j += 1
            kind = WS
        elif c == "(":
            j, kind = _closing(text, i, "(", ")", True), COMMENT
        elif c == '"':
            j, kind = _closing(text, i, '"', '"', False), QUOTED
        elif c == "[":
            j, kind = _closing(text, i, "[", "]", False), LITERAL
        elif c in _SPECIALS:
            j, kind = i + 1, c
        elif c in ")]\\" or c < " " or c == "\x7f":
            raise Unparsed(f"unexpected {c!r}")
        else:
            j = i
            while j < n and text[j] not in _STOP and text[j] >= " " and text[j] != "\x7f":
                j += 1
            kind = ATOM
        out.append((kind, i, j))
        i = j
    return out


def _dotted(toks, parts):
    """True when ``toks`` is ``part ("." part)*`` with each part of a kind in ``parts``."""
    if not toks or len(toks) % 2 == 0:
        return False
    return all(t[0] in parts if k % 2 == 0 else t[0] == "." for k, t in enumerate(toks))


def _addr_spec(text, toks):
    """``(spec, bare)`` of ``local-part ["@" domain]``, else Unparsed."""
    kinds = [t[0] for t in toks]
    at = kinds.index("@") if "@" in kinds else len(toks)
    local, domain = toks[:at], toks[at + 1:]
    if not _dotted(local, (ATOM, QUOTED)):
        raise Unparsed("no local part")
    if at < len(toks) and not (_dotted(domain, (ATOM,))
                               or (len(domain) == 1 and domain[0][0] == LITERAL)):
        raise Unparsed("no domain after @")
    return "".join(text[s:e] for _, s, e in toks), at == len(toks)


def _mailbox(text, toks, in_group):
    kinds = [t[0] for t in toks]
    routed = False
    if "<" in kinds:
        lt, gt = kinds.index("<"), kinds.index(">")
        if gt != len(toks) - 1 or any(k not in (ATOM, QUOTED, ".") for k in kinds[:lt]):
            raise Unparsed("text around <address>")
        inner = toks[lt + 1:gt]
        if not inner:
            return Address("", toks[lt][2], False, in_group, False)
        if any(t[0] == ":" for t in inner):
            colon = max(k for k, t in enumerate(inner) if t[0] == ":")
            inner, routed = inner[colon + 1:], True
    else:
        inner = toks
    spec, bare = _addr_spec(text, inner)
    return Address(spec, inner[-1][2], bare, in_group, routed)


def parse(text):
    """The :class:`Address` list of an address-list field body (or one
    sendmail argument).  Empty list elements are skipped (RFC 5322's obsolete
    syntax allows them); anything else unreadable raises :class:`Unparsed`."""
    sig = [t for t in tokens(text) if t[0] not in (WS, COMMENT)]
    out = []
    group = False
    i = 0
    while True:
        start, angle = i, False
        while i < len(sig):
            kind = sig[i][0]
            if kind == "<":
                if angle:
                    raise Unparsed("< inside <>")
                angle = True
            elif kind == ">":
                if not angle:
                    raise Unparsed("> without <")
                angle = False
            elif not angle and kind in ",;:":
                break
            i += 1
        if angle:
            raise Unparsed("unclosed <")
        element = sig[start:i]
        stop = sig[i][0] if i < len(sig) else None
        if stop == ":":
            if group or not element or any(t[0] not in (ATOM, QUOTED, ".") for t in element):
                raise Unparsed("a group needs a name")
            group, i = True, i + 1
            continue
        if element:
            out.append(_mailbox(text, element, group))
        if stop == ";":
            if not group:
                raise Unparsed("; outside a group")
            group, i = False, i + 1
            if i < len(sig) and sig[i][0] != ",":
                raise Unparsed("text after a group")
        if i >= len(sig):
            break
        i += 1
    if group:
        raise Unparsed("unclosed group")
    return out


def qualify(text, domain):
    """``text`` (a field body) with ``@domain`` after every bare local part
    outside a group; ``text`` unchanged when it cannot be parsed."""
    try:
        found = parse(text)
    except Unparsed:
        return text
    out, last = [], 0
    for a in found:
        if a.bare and a.spec and not a.in_group and not a.routed:
            out += [text[last:a.end], "@", domain]
            last = a.end
    out.append(text[last:])
    return "".join(out)
