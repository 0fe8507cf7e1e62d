"""Hostile input, fuzzed: whatever bytes arrive, the decoder either returns an event or raises
`DecodeError`, and through the Processor every message ends as exactly one verdict (plus its
flagged copy) or one dead letter, and is acked; nothing raises."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decode import DecodeError, InputLimits, decode_event
from schemas.events import DeadLetter, PromptEvent, ResponseEvent, VerdictEvent
from service.messages import DEAD_LETTER_MAX_KEY, DEAD_LETTER_MAX_PAYLOAD
from tests.security.support import Harness
from tests.security.support import settings as make_settings

LIMITS = [
    InputLimits(),
    InputLimits(max_message_bytes=4096, max_text_chars=100, over_limit="reject"),
    InputLimits(required_fields=frozenset({"tenant", "created_at"})),
]

REASONS = {"not_utf8", "not_json", "invalid", "empty_text", "too_large", "too_long"}
FIELDS = ["schema_version", "id", "conversation_id", "text", "tenant", "created_at", "metadata"]
FIELDS += ["reply_to", "prompt", "__proto__", ""]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Objects that look like events: the right field names with any JSON values.
event_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=9).map(
    lambda d: json.dumps(d).encode()
)
# Valid-looking events with hostile text: control characters, surrogate pairs, RTL marks, NULs.
hostile_text = st.text(
    alphabet=st.characters(categories=("Cc", "Cf", "Zs", "Lo", "So", "Cs")),
    min_size=0,
    max_size=200,
)


def _event(text: str, ascii_only: bool = True) -> bytes:
    """A prompt/response event (it has `reply_to`) with `text`; with `ascii_only=False` the text
    is written raw, lone surrogates included (which makes the bytes invalid UTF-8)."""
    body = {"id": "i", "conversation_id": "c", "text": text, "reply_to": "p"}
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


valid_with_hostile_text = st.builds(_event, hostile_text, st.booleans())
deep = st.integers(min_value=1, max_value=20_000).flatmap(
    lambda n: st.sampled_from(
        [
            b"[" * n + b"]" * n,
            b'{"a":' * n + b"1" + b"}" * n,
            b'{"id":"i","conversation_id":"c","text":"t","metadata":'
            + b'{"a":' * n
            + b'"x"'
            + b"}" * n
            + b"}",
        ]
    )
)
# A valid event with bytes spliced in (invalid UTF-8, raw control characters, truncation).
spliced = st.tuples(st.integers(min_value=0, max_value=60), st.binary(min_size=1, max_size=8)).map(
    lambda t: (lambda v: v[: t[0]] + t[1] + v[t[0] :])(_event("hello there"))
)
raw_values = st.binary(max_size=512) | event_like | valid_with_hostile_text | deep | spliced


def _decode_ok_or_decode_error(raw: bytes | None, cls: Any, limits: InputLimits) -> None:
    try:
        event = decode_event(raw, cls, limits)
    except DecodeError as err:
        assert err.reason in {
            "not_utf8",
            "not_json",
            "invalid",
            "empty_text",
            "too_large",
            "too_long",
        }
        assert str(err)
        return
    assert isinstance(event, cls)
    assert event.text.strip()


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_values | st.none())
def test_decoder_returns_an_event_or_a_decode_error(raw: bytes | None) -> None:
    for limits in LIMITS:
        _decode_ok_or_decode_error(raw, PromptEvent, limits)
        _decode_ok_or_decode_error(raw, ResponseEvent, limits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1_000_000, 1_048_577, 10 * 1024 * 1024])
def test_decoder_on_large_messages(size: int) -> None:
    """1 MB and 10 MB: over the byte limit, a too_large dead letter without parsing; under it, an
    event whose text the model input builder truncates later."""
    overhead = len(_event(""))
    raw = _event("x" * (size - overhead))
    assert len(raw) == size
    limits = InputLimits()
    if size > limits.max_message_bytes:
        with pytest.raises(DecodeError) as err:
            decode_event(raw, PromptEvent, limits)
        assert err.value.reason == "too_large"
    else:
        assert len(decode_event(raw, PromptEvent, limits).text) == size - overhead
        with pytest.raises(DecodeError) as err:
            decode_event(raw, PromptEvent, InputLimits(over_limit="reject"))
        assert err.value.reason == "too_long"
    # A huge message of garbage is refused by its size before any parsing.
    with pytest.raises(DecodeError) as err:
        decode_event(b"\xff" * (10 * 1024 * 1024), PromptEvent, limits)
    assert err.value.reason == "too_large"


def _check_outcomes(harness: Harness, values: list[bytes | None], kind: str) -> None:
    cfg = harness.settings
    assert len(harness.acked) == len(values), "every input is acked exactly once"
    assert [e.message.offset for e in harness.acked] == list(range(len(values)))
    for offset, raw in enumerate(values):
        out = harness.outcome(offset)
        topics = sorted(t for t, _ in out)
        if topics == [cfg.topic_dlq]:
            letter = DeadLetter.model_validate(out[0][1])
            payload, original = base64.b64decode(letter.payload_b64), raw or b""
            if len(original) > DEAD_LETTER_MAX_PAYLOAD:  # cut, so that it can be published
                assert payload == original[:DEAD_LETTER_MAX_PAYLOAD]
                assert f"of {len(original)} bytes" in letter.error
            else:
                assert payload == original
            assert letter.reason
            continue
        assert cfg.topic_verdicts in topics, f"input {offset} got {topics}"
        verdicts = [VerdictEvent.model_validate(v) for t, v in out if t == cfg.topic_verdicts]
        assert len(verdicts) == 1
        ve = verdicts[0]
        assert ve.kind == kind and ve.verdict.engine_error is None
        flagged = [v for t, v in out if t == cfg.topic_flagged]
        assert len(flagged) == (1 if ve.flagged else 0)


@pytest.mark.timeout(180)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(raw_values | st.none(), min_size=1, max_size=12))
def test_processor_turns_any_input_into_a_verdict_or_a_dead_letter(
    values: list[bytes | None], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cfg = make_settings(tmp_path_factory.getbasetemp(), moderate="both")
    values = [*values, _event("a valid message among them")]
    for topic, kind in ((cfg.topic_prompts, "prompt"), (cfg.topic_responses, "response")):
        harness = Harness(cfg)
        asyncio.run(harness.feed(topic, values))
        _check_outcomes(harness, values, kind)


@pytest.mark.timeout(120)
def test_processor_on_large_and_hostile_messages(tmp_path: Path) -> None:
    cfg = make_settings(tmp_path, moderate="prompts", max_text_chars=2000)
    values: list[bytes | None] = [
        _event("x" * 1_000_000),  # under the byte limit: judged on its cut text
        _event("y" * 1_100_000),  # over it: dead letter
        b"\xff" * (10 * 1024 * 1024),  # 10 MB of garbage: dead letter
        _event("\x00\x01\x1b[2J\u202e evil \u200b"),  # control and bidi characters, escaped
        b'{"id":"i","conversation_id":"c","text":"raw \x07 bell"}',  # raw control character
        b'{"id":"i","conversation_id":"c","text":"\\ud800"}',  # lone surrogate
        b"[" * 100_000,
        None,  # tombstone
    ]
    harness = Harness(cfg)
    asyncio.run(harness.feed(cfg.topic_prompts, values))
    _check_outcomes(harness, values, "prompt")
    reasons = {off: harness.outcome(off)[0][1].get("reason") for off in range(len(values))}
    assert reasons == {
        0: None,
        1: "too_large",
        2: "too_large",
        3: None,
        4: "not_json",
        5: "not_json",
        6: "not_json",
        7: "invalid",
    }
    # the model saw the 1 MB text cut to the configured size, around a visible marker
    big = [i for i in harness.backend.inputs if "characters omitted" in i]  # type: ignore[attr-defined]
    assert len(big) == 1 and len(big[0]) < 3000


@pytest.mark.timeout(60)
def test_dead_letter_of_a_huge_key_stays_publishable(tmp_path: Path) -> None:
    """A 2 MB key on an invalid message: the dead letter (key and copy of the key) is cut so that
    the producer can send it, instead of blocking the partition."""
    cfg = make_settings(tmp_path, moderate="prompts")
    huge = b"K" * (2 * 1024 * 1024)
    harness = Harness(cfg)
    asyncio.run(harness.feed(cfg.topic_prompts, [b"{oops", _event("fine")], keys=[huge, huge]))
    dead = [r for r in harness.sent if r.topic == cfg.topic_dlq]
    assert len(dead) == 1
    assert dead[0].key == huge[:DEAD_LETTER_MAX_KEY]
    assert len(dead[0].key or b"") + len(dead[0].value) < 1_000_000
    letter = DeadLetter.model_validate_json(dead[0].value)
    assert base64.b64decode(letter.key_b64 or "") == huge[:DEAD_LETTER_MAX_KEY]
    assert f"key cut to its first {DEAD_LETTER_MAX_KEY} of {len(huge)} bytes" in letter.error
    # a valid message with that key gets its verdict, keyed by its conversation
    verdicts = [r for r in harness.sent if r.topic == cfg.topic_verdicts]
    assert len(verdicts) == 1 and verdicts[0].key == b"c"
