"""JSON request bodies parsed within a bounded multiple of their size.

The standard parser builds a Python object for every JSON value: up to ~100 bytes for a tiny one (`1,` or
`{"b64": ""},`), twenty times its text or more. So a body is parsed only once a count of its separators (`,` `:`
`[` `{`, each value but the first follows one) shows it holds at most MAX_JSON_VALUES values; a request is a few
dozen values around its images, and more is refused 413 `too_many_json_values` before any is built. The one
exception is a long array of plain numbers (FP32 pixels of the Open Inference Protocol), which `load_json(...,
numbers=True)` cuts out of the text before the parse and leaves as `Numbers`: its values are read straight into
float32 when the route asks, never as Python numbers.

Parsing a body of B bytes thus holds at most about 3 B (the body, its strings, or its float32 values of 4 bytes
for every 2 or more bytes of text) plus MAX_JSON_VALUES small objects (about 1 MiB); docs/SERVING.md, "Limits".
"""

from __future__ import annotations

import json
import re
from functools import partial
from typing import Any

import numpy as np

from core.members import json_values
from service.errors import ClientError

MAX_JSON_VALUES = 10_000  # ~1 MiB of Python objects at most; a request of 16 images in JSON holds about 60 values
LONG_NUMBERS = 1024  # an array of plain numbers this long (bytes) or longer is read natively, as `Numbers`
_PLAIN = rb"-+0-9.eE,\[\] \t\r\n"  # the characters of an array of plain numbers, with JSON's white space
# From a '[', as far as the plain characters go. Possessive, so a failed match is never retried from inside it:
# each '[' that starts a run is looked at once, and the run is then skipped (linear in the body).
_RUN = re.compile(rb"\[[" + _PLAIN + rb"]*+")
_PLACEHOLDER = "\0flower.numbers"
_CHUNK = 1 << 18  # numbers are parsed this many bytes of text at a time (~2 MiB of temporaries)
_SPELLING_WINDOW = 1 << 15
_BRACKETS = bytes.maketrans(b"[]", b"  ")


class Numbers:
    """A long JSON array of plain numbers (nested or not), cut out of a body unparsed; `parse` reads it."""

    def __init__(self, body: bytes, start: int, end: int) -> None:
        self.body, self.start, self.end = body, start, end

    def __repr__(self) -> str:
        return f"[{len(self)} numbers]"

    def __len__(self) -> int:
        """How many values the array holds when it is well formed (its commas plus one)."""
        return self.body.count(b",", self.start, self.end) + 1

    def parse(self) -> np.ndarray:
        """The values in order, flattened, as float32; ValueError naming the problem when one is not a number."""
        out = np.empty(len(self), np.float32)
        filled, start = 0, self.start + 1
        while start < self.end:
            stop = self.body.find(b",", min(start + _CHUNK, self.end), self.end - 1)
            stop = self.end - 1 if stop < 0 else stop
            values = _plain_numbers(self.body[start:stop])
            out[filled:filled + len(values)] = values
            filled, start = filled + len(values), stop + 1
        if filled != len(out):
            raise ValueError(f"{filled} numbers read of {len(out)}")
        return out


def _plain_numbers(text: bytes) -> np.ndarray:
    """The comma-separated numbers of one piece of an array (brackets ignored), as float32."""
    bare = text.translate(None, b" \t\r\n[]")
    if not bare or bare.startswith(b",") or bare.endswith(b",") or b",," in bare:
        raise ValueError("an element is missing (two commas in a row, an empty list, or a comma at an end)")
    try:
        values = np.fromstring(text.translate(_BRACKETS), dtype=np.float32, sep=",")
    except ValueError:
        values = None
    if values is None or len(values) != bare.count(b",") + 1:
        raise ValueError("an element is not a number")
    if not _json_spellings(text):
        raise ValueError("an element is not a number as JSON writes one (+1, .5, 1. and 01 are not)")
    return values


def _json_spellings(text: bytes) -> bool:
    """No number of a piece that numpy reads is spelled as JSON forbids: a leading '+', a '.' without a digit
    on both sides, or an integer part that starts with 0 and goes on (numpy reads +1, .5, 1. and 01; JSON not).
    Looked at 32 KiB at a time, so that its masks stay small beside the piece's numbers."""
    padded = np.frombuffer(b",," + text + b",", np.uint8)  # a piece is cut at commas: one stands at either end
    for start in range(2, len(padded) - 1, _SPELLING_WINDOW):
        stop = min(start + _SPELLING_WINDOW, len(padded) - 1)
        at, prev, prev2, after = (padded[start + shift:stop + shift] for shift in (0, -1, -2, 1))
        prev_digit, next_digit = (prev >= ord("0")) & (prev <= ord("9")), (after >= ord("0")) & (after <= ord("9"))
        exponent = (prev == ord("e")) | (prev == ord("E"))
        signed_exponent = ((prev == ord("-")) | (prev == ord("+"))) & ((prev2 == ord("e")) | (prev2 == ord("E")))
        bad = (at == ord("+")) & ~exponent
        bad |= (at == ord(".")) & ~(prev_digit & next_digit)
        bad |= (at == ord("0")) & next_digit & ~(prev_digit | (prev == ord(".")) | exponent | signed_exponent)
        if bad.any():
            return False
    return True


def _array_end(body: bytes, start: int, end: int) -> int:
    """The index just past the ']' that closes the '[' at `start`, looking no further than `end` (-1: none)."""
    depth = 0
    for at in range(start, end, _CHUNK):
        piece = np.frombuffer(body, np.uint8, min(_CHUNK, end - at), at)
        marks = np.flatnonzero((piece == ord("[")) | (piece == ord("]")))  # the brackets alone: a few per number
        levels = depth + np.cumsum(np.where(piece[marks] == ord("["), 1, -1))
        closed = np.flatnonzero(levels == 0)
        if len(closed):
            return at + int(marks[closed[0]]) + 1
        depth = int(levels[-1]) if len(levels) else depth
    return -1


def _cut_numbers(body: bytes) -> tuple[bytes, list[Numbers]]:
    """The body with each long array of plain numbers replaced by a placeholder object, and those arrays."""
    pieces, found, done, runs = [], [], 0, 0
    for run in _RUN.finditer(body):
        runs += 1
        if runs > MAX_JSON_VALUES:  # every run is a value of its own: too many is refused by the count anyway
            break
        if run.end() - run.start() < LONG_NUMBERS:
            continue
        end = _array_end(body, run.start(), run.end())
        if end < 0:  # not closed within the run: not an array of numbers, left for the parser to judge
            continue
        pieces += [body[done:run.start()], json.dumps({_PLACEHOLDER: len(found)}).encode()]
        found.append(Numbers(body, run.start(), end))
        done = end
    return (b"".join([*pieces, body[done:]]) if found else body), found


def load_json(body: bytes, numbers: bool = False, hint: str = "") -> Any:
    """A JSON body parsed within MAX_JSON_VALUES values (ClientError 413 past it, with `hint` after the reason);
    with `numbers`, each long array of plain numbers comes back as `Numbers`. ValueError when it is not JSON."""
    text, found = _cut_numbers(body) if numbers else (body, [])
    values = json_values(text)
    if values > MAX_JSON_VALUES:
        raise ClientError(413, "too_many_json_values", f"the JSON body holds up to {values} values (counted by "
                                                       f"their separators), more than the {MAX_JSON_VALUES} a "
                                                       f"request needs{hint}")
    if not found:
        return json.loads(text)
    try:
        return json.loads(text, object_pairs_hook=partial(_placeholder, found))
    except ValueError as err:  # an array cut out of a string ("id": "[1,2,...]") leaves no JSON: parse as it came
        try:
            return load_json(body, hint=hint)
        except ClientError:  # too many values uncut: the body's own fault is the one to report
            raise err from None


def _placeholder(found: list[Numbers], pairs: list[tuple[str, Any]]) -> Any:
    """An object of the parsed text: the `Numbers` a placeholder stands for, else a dict."""
    if len(pairs) == 1 and pairs[0][0] == _PLACEHOLDER and type(pairs[0][1]) is int and 0 <= pairs[0][1] < len(found):
        return found[pairs[0][1]]
    return dict(pairs)
