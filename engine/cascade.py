"""The guard cascade's escalation policy: a small model answers, a large one only where needed.

GuardReasoner-1B decodes at about a sixth of GuardReasoner-8B's cost and agrees with it on most
inputs. The cascade publishes the first (small) model's verdict unless one of the policy's
*signals* fires on it; then the request is generated again by the second (large) model and that
verdict is published instead. The signals read only the first model's verdict, as the parser
read its generated text (`Verdict.raw`, `Verdict.reasoning`): no token probabilities.

Signals, in the order `escalation_reason` tries them (`SIGNALS`):

* ``untrusted``: the verdict is not trusted (`Verdict.trusted` False): no label or a missing
  one (``unparsed``, ``incomplete``), the model contradicting itself (``conflicting``, whose
  label `engine.parser.CONFLICT_RULE` resolved), an output cut at the token cap (``truncated``)
  or no output at all (``engine_error``).
* ``contradiction``: the model contradicts itself on a task that applies: the parser's
  ``conflicting`` (two answer blocks, or a conclusion and the chosen label, disagree), or the
  deciding conclusion (below) states the other label of its task in words the parser's
  conclusion rule does not read (``... is considered harmful``), while the chosen label says
  otherwise.
* ``hedge``: the *deciding conclusion* hedges or is missing. The deciding task is the one whose
  label the request turns on: the request for a prompt-only request (its Task 1, also in a
  Task 1-only early-exit output), the response's harmfulness for a request with a response. Its
  conclusion is the parser's (`Verdict.reasoning`): the task's last conclusion, else its last
  reasoning step (most outputs write no conclusion heading); it hedges when one of its
  sentences holds a hedge (`HEDGES`: could, may, might, potentially, depends on, if, ...).

Quotes of the user's text neither fire nor suppress a signal: the parser already left out the
conclusions and steps that are quotes (`engine.parser`, quotes are not answers); within a
conclusion, text in double quotes and any sentence that occurs in the user's texts (`quoted`,
compared folded as the parser compares them, `engine.parser.fold`) are not read.

`escalation_reason` is what the streaming guard and `guardstream evaluate` both call on the first
model's verdict, the one the guard would otherwise publish (after an early-exit verdict that
`engine.parser.needs_full_output` was generated again in full). The default policy
(`DEFAULT_POLICY`) is the measured choice of the README's Evaluation section.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from engine.parser import TASK_LABELS, fold
from schemas.verdict import Task, Verdict

Signal = Literal["untrusted", "contradiction", "hedge"]
#: Every signal, in the order `escalation_reason` tries them.
SIGNALS: tuple[Signal, ...] = get_args(Signal)

#: What makes a conclusion's sentence hedge (whole words, case-insensitive).
HEDGES = (
    "could",
    "may",
    "might",
    "potentially",
    "possibly",
    "depends on",
    "depending on",
    "if",
)
_HEDGE = re.compile(r"\b(?:" + "|".join(re.escape(h) for h in HEDGES) + r")\b", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?\n]+")
_IN_QUOTES = re.compile(r"\"[^\"\n]*\"|\u201c[^\u201d\n]*\u201d")
# Words that may stand between a copula and the label it states (bounded: linear on any text).
_FILLER = (
    r"(?:an?|also|as|clearly|considered|deemed|classified|categori[sz]ed|regarded|seen|viewed"
    r"|labell?ed|judged|therefore|thus|hence|inherently|likely|potentially|possibly|generally"
    r"|overall|ultimately|still|more|very|highly|indeed|definitely|explicitly|directly|in)"
)
_STATED = re.compile(
    rf"(?<![\w'])(?:is|are|be|been|was|were)\s+(?P<not>not\s+)?(?:{_FILLER}\s+){{0,3}}"
    r"(?P<value>unharmful|harmful|refusal|compliance)\b(?!\s+(?:or|nor)\b)",
    re.IGNORECASE,
)
_NEGATED = re.compile(
    r"\b(?:not|cannot|never|neither|nor|no|without|if|whether|unless|while|although|though)\b"
    r"|n't\b",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"[,;:(]")
_SUBJECT = re.compile(
    r"\b(request|prompt|query|question|user|response|assistant|answer|reply)s?\b", re.IGNORECASE
)
_RESPONSE_WORDS = frozenset({"response", "assistant", "answer", "reply"})


@dataclass(frozen=True, slots=True)
class EscalationPolicy:
    """Which signals send a request to the second model; no signal: the first model alone."""

    signals: frozenset[Signal]

    @classmethod
    def parse(cls, text: str) -> EscalationPolicy:
        """``"untrusted,contradiction,hedge"`` (comma or ``+`` separated, any order and case);
        ``""`` or ``"none"``: no signal. An unknown name is a ValueError naming it."""
        names = [n.strip().lower() for n in re.split(r"[,+]", text) if n.strip()]
        if names == ["none"]:
            return cls(frozenset())
        signals: set[Signal] = set()
        for name in names:
            signal = _SIGNAL_BY_NAME.get(name)
            if signal is None:
                valid = ", ".join(SIGNALS)
                raise ValueError(f"unknown escalation signal {name!r}: valid are {valid} (or none)")
            signals.add(signal)
        return cls(frozenset(signals))

    @property
    def name(self) -> str:
        """The canonical name: the signals sorted, joined by ``+``; ``none`` without one. Part
        of the cascade's cache key."""
        return "+".join(sorted(self.signals)) or "none"

    def __str__(self) -> str:
        return self.name


_SIGNAL_BY_NAME: dict[str, Signal] = {s: s for s in SIGNALS}

#: The policy the cascade runs with unless told otherwise (README, Evaluation: measured).
DEFAULT_POLICY = EscalationPolicy(frozenset({"untrusted", "contradiction", "hedge"}))


def escalation_reason(
    verdict: Verdict,
    policy: EscalationPolicy,
    *,
    has_response: bool,
    quoted: Sequence[str | None] = (),
) -> Signal | None:
    """The first signal of `policy` (in `SIGNALS` order) that fires on the first model's
    `verdict`, or None: publish it. `has_response`: the request had a response; `quoted`: the
    user's texts as they stood in the model input (`engine.prompt.user_texts`)."""
    for signal in SIGNALS:
        if signal in policy.signals and _FIRES[signal](verdict, has_response, quoted):
            return signal
    return None


def deciding_task(has_response: bool) -> Task:
    """The task whose label a request turns on: the response's harmfulness, else the request's."""
    return "response" if has_response else "request"


def _untrusted(verdict: Verdict, has_response: bool, quoted: Sequence[str | None]) -> bool:
    return not verdict.trusted


def _contradiction(verdict: Verdict, has_response: bool, quoted: Sequence[str | None]) -> bool:
    if verdict.found == "conflicting":
        return True
    task = deciding_task(has_response)
    label = _label(verdict, task)
    conclusion = _conclusion(verdict, task)
    if label is None or conclusion is None:
        return False
    return any(
        value != label and not hedged for value, hedged in _statements(conclusion, task, quoted)
    )


def _hedge(verdict: Verdict, has_response: bool, quoted: Sequence[str | None]) -> bool:
    conclusion = _conclusion(verdict, deciding_task(has_response))
    if conclusion is None:
        return True
    return any(_HEDGE.search(sentence) for sentence in _sentences(conclusion, quoted))


def _statements(text: str, task: Task, quoted: Sequence[str | None]) -> list[tuple[str, bool]]:
    """The labels of `task` that the model's own sentences of `text` state, in order, with
    whether each is hedged: ``is|are|be <label>``, with at most three words of `_FILLER`
    between (``is considered harmful``; ``is not harmful`` states unharmful), about the task's
    subject (a sentence about the response does not state the request's label, and the other
    way round), and not in a clause (from its last comma, colon, semicolon or parenthesis) with
    a negation or a condition."""
    labels = TASK_LABELS[task]
    found: list[tuple[str, bool]] = []
    for sentence in _sentences(text, quoted):
        for match in _STATED.finditer(sentence):
            value = match.group("value").lower()
            if value not in labels:
                continue
            before = sentence[: match.start()]
            if not _about(task, before):
                continue
            clause = _CLAUSE_BREAK.split(before)[-1]
            if _NEGATED.search(clause):
                continue
            if match.group("not"):
                if value != "harmful":  # "is not unharmful", "is not a refusal": no statement
                    continue
                value = "unharmful"
            found.append((value, bool(_HEDGE.search(clause))))
    return found


def _about(task: Task, before: str) -> bool:
    """Whether a statement whose sentence reads `before` up to its copula is about `task`'s
    subject: the last subject word there names it, or none does (``it``, ``this``)."""
    subjects = _SUBJECT.findall(before)
    if not subjects:
        return True
    last = subjects[-1].lower()
    return (last in _RESPONSE_WORDS) == (task != "request")


_FIRES = {
    "untrusted": _untrusted,
    "contradiction": _contradiction,
    "hedge": _hedge,
}


def _label(verdict: Verdict, task: Task) -> str | None:
    if task == "request":
        return verdict.request
    if task == "completion":
        return verdict.completion
    return verdict.response


def _conclusion(verdict: Verdict, task: Task) -> str | None:
    """The deciding conclusion of `task`: its last conclusion, else (the model often writes
    none) its last reasoning step, the one the parser reads a label from (rule 4); None when the
    model wrote neither."""
    reasoning = verdict.reasoning.get(task)
    if reasoning is None:
        return None
    if reasoning.conclusion:
        return reasoning.conclusion
    return reasoning.steps[-1] if reasoning.steps else None


def _sentences(text: str, quoted: Sequence[str | None]) -> list[str]:
    """The sentences of `text` that are the model's own: double-quoted text left out, and any
    sentence that occurs in the user's texts (compared folded, as the parser compares)."""
    haystacks = [folded for q in quoted if q and (folded := fold(q))]
    own = []
    for sentence in _SENTENCE.findall(_IN_QUOTES.sub(" ", text)):
        needle = fold(sentence)
        if needle and not any(needle in hay for hay in haystacks):
            own.append(sentence)
    return own
