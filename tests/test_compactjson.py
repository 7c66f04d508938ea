"""mailsys.compactjson gives exactly json.dumps(separators=(",", ":"), ensure_ascii=False)."""
import json
import math

import pytest

from mailsys.compactjson import dumpb, dumps

CASES = [
    {}, [], "", 0, -1, 2 ** 70, 1.5, 1e-7, 1764289525.123456, True, False, None,
    {"id": "19852CDA2FBD34000", "from": "bench@example.org", "rcpt": [["joe@example.com", None, None]],
     "size": 4424, "t": 1764289525.123, "client": "localhost[127.0.0.1]"},
    {"to": "jörg@bücher.example", "why": "quota \u2028 \"quoted\" \\ back\nslash\t\x00\x1f"},
    {"nested": [[[{"a": [1, {"b": None}]}]]], "emoji": "\U0001F4EC", 3: "int key"},
    {"nan": math.nan, "inf": math.inf, "ninf": -math.inf},
]


@pytest.mark.parametrize("obj", CASES)
def test_same_text_as_json_dumps(obj):
    want = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert dumps(obj) == want
    assert dumpb(obj) == want.encode("utf-8")


def test_what_json_cannot_encode_is_refused_as_json_refuses_it():
    with pytest.raises(TypeError):
        dumps({"x": object()})
    with pytest.raises(TypeError):
        dumps({(1, 2): "tuple key"})
