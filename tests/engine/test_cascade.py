"""engine.cascade: the escalation policy's names and parsing, and each signal on crafted outputs."""

from __future__ import annotations

import pytest

from engine.cascade import (
    DEFAULT_POLICY,
    SIGNALS,
    EscalationPolicy,
    escalation_reason,
)
from schemas.verdict import Verdict

ALL = EscalationPolicy(frozenset(SIGNALS))


def test_policy_parse_and_canonical_name() -> None:
    policy = EscalationPolicy.parse("untrusted, Hedge+contradiction")
    assert policy.signals == frozenset({"untrusted", "contradiction", "hedge"})
    assert policy.name == "contradiction+hedge+untrusted"
    assert EscalationPolicy.parse(policy.name) == policy
    assert EscalationPolicy.parse("hedge,untrusted").name == "hedge+untrusted"


@pytest.mark.parametrize("text", ["", "none", " None ", ","])
def test_policy_without_signals(text: str) -> None:
    policy = EscalationPolicy.parse(text)
    assert policy.signals == frozenset()
    assert policy.name == "none"


def test_policy_unknown_signal_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        EscalationPolicy.parse("untrusted,unsure")
    message = str(info.value)
    assert "'unsure'" in message
    for signal in SIGNALS:
        assert signal in message
    with pytest.raises(ValueError, match="'none'"):
        EscalationPolicy.parse("none,hedge")


def test_default_policy_is_a_valid_policy() -> None:
    assert DEFAULT_POLICY.signals <= frozenset(SIGNALS)
    assert EscalationPolicy.parse(DEFAULT_POLICY.name) == DEFAULT_POLICY


def test_no_signal_never_escalates() -> None:
    none = EscalationPolicy.parse("none")
    assert escalation_reason(Verdict(engine_error="boom"), none, has_response=False) is None
