"""Compact JSON text (``separators=(",", ":")``, ``ensure_ascii=False``), cheaply.

The spool's envelopes, the queue journal's records and the MDA's delivery log
are JSON, several encodings per message.  ``json.dumps`` with those arguments
builds a new ``JSONEncoder`` on every call, and ``JSONEncoder.encode`` then
builds a new C encoder (``c_make_encoder``) for every call too: about 9 µs for
an envelope, of which the encoding itself is about a third.  Here the C encoder
is built once.  The output is byte for byte what ``json.dumps(obj,
separators=(",", ":"), ensure_ascii=False)`` gives (a unit test holds it to
that); without the C extension, that is what is called.
"""
import json
from json import encoder as _encoder

_SLOW = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

if _encoder.c_make_encoder is not None:
    # (markers, default, encoder, indent, key_separator, item_separator,
    #  sort_keys, skipkeys, allow_nan): no circular check, as json.dumps would
    # have one -- our records are plain trees built by our own code.
    _C = _encoder.c_make_encoder(None, _SLOW.default, _encoder.encode_basestring, None,
                                 ":", ",", False, False, True)

    def dumps(obj):
        return "".join(_C(obj, 0))
else:   # pragma: no cover - CPython always has _json
    dumps = _SLOW.encode


def dumpb(obj):
    """:func:`dumps` as UTF-8 bytes."""
    return dumps(obj).encode("utf-8")
