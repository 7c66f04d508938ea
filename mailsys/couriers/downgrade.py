"""8BITMIME downgrade (RFC 6152 section 3): an 8-bit body made 7-bit for a
server that does not offer 8BITMIME.

Only what must change changes: each leaf part whose body has 8-bit bytes is
re-encoded (``text/*`` as quoted-printable, anything else as base64) and gets a
new ``Content-Transfer-Encoding``; every other byte, header and boundary stays
as it was.  Multipart bodies are walked part by part; ``message/rfc822`` is
walked into.  What cannot be converted without changing meaning returns None
and the caller bounces with ``5.6.3``: 8-bit bytes in a header (that would need
RFC 2047 re-encoding, which is the author's business), a part declared
``binary`` or already ``quoted-printable``/``base64`` yet 8-bit, 8-bit bytes in
a preamble or epilogue, or a multipart without a usable boundary.
"""
import base64
import binascii
import re

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)
_MAX_DEPTH = 20


def downgrade(message):
    """The message with only 7-bit bytes, or None when that is impossible."""
    try:
        return _entity(bytes(message), 0)
    except _Impossible:
        return None


class _Impossible(Exception):
    pass


def _split(entity):
    """``(header block incl. its final CRLF, body)``; the blank line belongs to neither."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    end = entity.find(b"\r\n\r\n")
    if end < 0:
        return entity, None
    return entity[:end + 2], entity[end + 4:]


def _fields(head):
    """``[(lower-case name, raw field bytes incl. continuation lines)]``."""
    out = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\r\n" + line)
        else:
            m = _FIELD.match(line)
            out.append(((m.group(1).lower() if m else b""), line))
    return out


def _value(fields, name):
    for key, raw in fields:
        if key == name:
            value = raw.split(b":", 1)[1] if b":" in raw else b""
            return re.sub(rb"\r\n[ \t]", b" ", value).strip()
    return None


def _content_type(fields, default=b"text/plain"):
    value = _value(fields, b"content-type")
    if not value:
        return default, {}
    main, _, rest = value.partition(b";")
    params = {}
    for m in re.finditer(rb';?\s*([!#-\'*+.0-9A-Z^-~]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)', b";" + rest):
        v = m.group(2)
        if v.startswith(b'"'):
            v = re.sub(rb"\\(.)", rb"\1", v[1:-1])
        params[m.group(1).lower()] = v
    return main.strip().lower(), params


def _entity(entity, depth):
    if entity.isascii():
        return entity
    if depth > _MAX_DEPTH:
        raise _Impossible()
    head, body = _split(entity)
    if not head.isascii():
        raise _Impossible()
    if body is None:
        raise _Impossible()
    fields = _fields(head)
    parent_default = b"text/plain"
    ctype, params = _content_type(fields, parent_default)
    cte = (_value(fields, b"content-transfer-encoding") or b"7bit").lower()
    if ctype.startswith(b"multipart/"):
        if cte not in (b"7bit", b"8bit"):
            raise _Impossible()
        return head + b"\r\n" + _multipart(body, params.get(b"boundary"), depth, ctype)
    if ctype == b"message/rfc822":
        if cte not in (b"7bit", b"8bit"):
            raise _Impossible()
        return head + b"\r\n" + _entity(body, depth + 1)
    if cte not in (b"7bit", b"8bit"):
        raise _Impossible()   # binary, or an encoded body with 8-bit bytes: broken
    if ctype.startswith(b"text/"):
        encoded, name = _quoted_printable(body), b"quoted-printable"
    else:
        encoded, name = _base64(body), b"base64"
    kept = [raw for key, raw in fields if key != b"content-transfer-encoding"]
    new_head = b"".join(raw + b"\r\n" for raw in kept)
    new_head += b"Content-Transfer-Encoding: " + name + b"\r\n"
    return new_head + b"\r\n" + encoded


def _multipart(body, boundary, depth, ctype):
    if not boundary or len(boundary) > 70 or not boundary.isascii():
        raise _Impossible()
    delimiter = re.compile(rb"(?:^|(?<=\r\n))--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|$)")
    pieces = []
    pos = 0
    last = None
    for m in delimiter.finditer(body):
        pieces.append((pos, m.start(), m))
        pos = m.end()
        if m.group(1):
            last = m
            break
    if not pieces or last is None:
        raise _Impossible()
    out = []
    preamble_end = pieces[0][1]
    preamble = body[:preamble_end]
    if not preamble.isascii():
        raise _Impossible()
    out.append(preamble)
    for i, (start, end, m) in enumerate(pieces):
        if i > 0:
            part = body[start:end]
            # The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
            if part.endswith(b"\r\n"):
                out.append(_part(part[:-2], depth, ctype) + b"\r\n")
            else:
                out.append(_part(part, depth, ctype))
        out.append(m.group(0))
    epilogue = body[pieces[-1][2].end():]
    if not epilogue.isascii():
        raise _Impossible()
    out.append(epilogue)
    return b"".join(out)


def _part(part, depth, parent_type):
    if part.isascii():
        return part
    if parent_type == b"multipart/digest":
        head, body = _split(part)
        fields = _fields(head or b"")
        if _value(fields, b"content-type") is None:
            part = b"Content-Type: message/rfc822\r\n" + part
    return _entity(part, depth + 1)


def _quoted_printable(body):
    """RFC 2045 quoted-printable with CRLF line ends (line breaks kept as they are)."""
    encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
    # b2a_qp keeps a leading "From " and "." as they are; dot-stuffing handles the dot.
    return encoded


def _base64(body):
    raw = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return raw
