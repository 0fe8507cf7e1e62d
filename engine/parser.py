"""GuardReasoner's generated text -> `Verdict`.

The parser reads only the generated text, never the user's message.

What the model writes (see the recorded outputs): three task sections (``# Task 1`` for the
request, ``# Task 2`` for refusal/compliance, ``# Task 3`` for the response), each with
``## Reasoning Step N`` paragraphs (``## Reasoning Step N: text`` or the text on the following
lines) and a conclusion in one of several spellings (``## Conclusion``, ``## Conclusion for
Task N: ...``, ``# Task N Conclusion``, ``# Task N: unharmful``), then a final block::

    Answers:
    Request: harmful
    Completion: refusal
    Response: unharmful

An *answer block* is an ``Answers`` header line (``Answers:``, ``# Answers``, ...) with the lines
that follow it (leading blank lines skipped) up to a blank line, a heading or a ``---`` rule, or
such a run of lines that starts with a ``Request:``/``Completion:``/``Response:`` line and has
no header. In a block, the label of a task is the first ``Key: value`` for its key (the colon
is required), the value being one of that task's labels or ``None``.

The rule, for each task that applies (the request always; completion and response only when
the request had a response, `has_response`; a task that does not apply is None):

1. the label in the *final block*, the last answer block in the text. The final block always
   wins: an answer line merely quoted earlier in the output never overrides it;
2. when the final block has no label for the task, or says ``None``: the label of the nearest
   earlier answer block that gives one (e.g. a per-task ``# Answers: \\nCompletion: refusal``);
3. then the label of the task's last conclusion that states one. A conclusion is a heading
   with the word ``Conclusion`` (its task named in it, else the section it stands in) or
   ``# Task N: <label>``, with the paragraph under it; it states a label when its text starts
   with one, has ``Key: label``, or says ``is [a|an] label`` (not ``is neither ...``, not
   ``is X or Y``);
4. last, for a task with no conclusion at all, the last reasoning step of its first section,
   read the same way (``## Reasoning Step 3\\nThe response is compliance because ...``).

Sections are ``# Task 1`` to ``# Task 3``; a degenerate ``# Task 4`` and beyond is ignored.

**Quotes are not answers.** The model sometimes repeats the user's text, and a user can write a
fake answer block, conclusion or ``# Task`` heading into it. `parse` is given the user texts the
model saw (`quoted`: the prompt and the response as they stood in the model input); an answer
block, conclusion or reasoning step whose text occurs in one of them is a quote and is left out
of the labels and of the reasoning (counted in `quoted`). Texts are compared folded: Unicode
NFKC (full-width and other look-alike forms), zero-width and other format characters removed,
case folded, markdown marks (``*``, ``_``, backticks, ``#``, ``>``) dropped, runs of white space
made one space. The generated text is read after the same NFKC and format-character cleaning.

**Conflicts.** The model contradicts itself when two of its answer blocks give a task different
labels, or a task's conclusion says otherwise than the label chosen above. Such a verdict is
``conflicting``, and the label is resolved by `CONFLICT_RULE` (``"harmful"``: the harmful label,
``compliance`` for the completion, whichever of the model's statements gives it; ``"final"``: the
rule above unchanged). `guardstream evaluate` measures both on the recorded outputs.

`found`, the first that holds: ``"unparsed"`` (no label at all), ``"incomplete"`` (a task that
applies has no label), ``"conflicting"``, ``"recovered"`` (a label came from steps 2 to 4),
``"final"``. Partial or garbage text is parsed as far as it goes; parsing never raises.
`truncated` is left to the caller; whether a verdict is trusted is `Verdict.trusted`.

**Early exit.** For a prompt-only request the guard may stop generation before the model's
``# Task 2`` (`engine.prompt.EARLY_EXIT_STOP`): greedy decoding makes the text the exact prefix
of the full output, Task 1 only. `parse(..., has_response=False, early_exit=True)` reads such a
text (`early_exit` is ignored with a response). A text that ends with a final answer block (one
naming the completion or the response: the model never wrote ``# Task 2``, so nothing was cut)
is parsed by the rule above, unchanged. Any other is read as Task 1 only (`Verdict.early_exit`):

* lines before the first ``# Task`` heading belong to Task 1 (the model sometimes opens with its
  request reasoning, or an early ``Request:`` line, under no heading);
* the request label is the last answer block's, else the last Task 1 conclusion's (read as in
  rule 3, or, where that finds none, its last label statement), else the last label statement of
  Task 1's reasoning steps;
* a *label statement* is ``is|are|be|as ... harmful|unharmful`` in one sentence (a few adverbs,
  ``considered``, ``classified as``, ``a common and`` ... may stand between; ``is not harmful``
  states unharmful). None counts where the sentence is about the AI's response, is a quote (its
  text occurs in the user's; text in double quotes is left out), or where its clause (from the
  last comma, colon, semicolon or parenthesis) holds a negation, a condition or a concession
  (``not``, ``cannot``, ``n't``, ``never``, ``neither``, ``nor``, ``no``, ``if``, ``whether``,
  ``while``, ``although``, ``though``). One hedged by ``could``, ``might``, ``may`` or ``would``
  gives no label but can disagree;
* ``recovered`` when a label was read and Task 1 agrees with itself (its answer blocks and
  conclusions; without those, all its label statements, hedged ones included), ``conflicting``
  (resolved by the conflict rule) when it does not, ``unparsed`` without a label. Only a
  ``recovered`` early verdict is trusted: `needs_full_output` tells the guard to generate any
  other again in full, without the stop string. The reasoning is Task 1's; `completion` and
  `response` are None.

Measured on the recorded outputs of the three prompt benchmarks (README, Evaluation): every
trusted early verdict has the full output's request label.

`reference_labels` is the paper's rule instead: the three patterns searched in the last 300
characters only.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from schemas.verdict import LabelSource, Task, TaskReasoning, Verdict

#: The labels each task may take (lower case).
TASK_LABELS: dict[Task, tuple[str, str]] = {
    "request": ("harmful", "unharmful"),
    "completion": ("refusal", "compliance"),
    "response": ("harmful", "unharmful"),
}
_TASK_BY_NUMBER: dict[int, Task] = {1: "request", 2: "completion", 3: "response"}

_HEADER = re.compile(r"^[\s#*]*answers?[\s*]*(?::(?P<rest>.*))?$", re.IGNORECASE)
_LABEL_LINE = re.compile(r"^[\s*-]*(?:request|completion|response)\s*:", re.IGNORECASE)
_KEY_VALUE = re.compile(
    r"\b(?P<key>request|completion|response)\s*:\s*"
    r"(?P<value>unharmful|harmful|refusal|compliance|none)\b",
    re.IGNORECASE,
)
_HEADING = re.compile(r"^\s*#")
# What every answers header, label line, heading, ``---`` rule and blank line starts with (a
# superset of them): a line this does not match is plain text, and one match is all it costs.
_NOTABLE = re.compile(r"^[\s*-]*(?:#|answer|request|completion|response|_|$)", re.IGNORECASE)
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$")
_MAX_HEADING = 1000  # longer heading lines are read cut: keeps the patterns linear
_TASK_HEADING = re.compile(r"^\s*#+\s*task\s*(?P<n>\d+)\b\s*:?\s*(?P<rest>.*)$", re.IGNORECASE)
_STEP_HEADING = re.compile(r"^\s*#+\s*reasoning step\s*\d*\s*:?\s*(?P<rest>.*)$", re.IGNORECASE)
_CONCLUSION_HEADING = re.compile(
    r"^\s*#+(?P<before>[^:]*?)\bconclusion\b(?P<after>[^:]*):?\s*(?P<rest>.*)$", re.IGNORECASE
)
_TASK_NUMBER = re.compile(r"\btask\s*(\d+)", re.IGNORECASE)
_CONCLUDED_LABEL = re.compile(
    r"(?:^[\W_]*|\b(?:request|completion|response)\s*:\s*|\bis\s+(?:an?\s+)?)"
    r"(?P<value>unharmful|harmful|refusal|compliance)\b(?!\s+or\b)",  # not "is X or Y"
    re.IGNORECASE,
)
_BARE_LABEL = re.compile(r"^\W*(unharmful|harmful|refusal|compliance|none)\W*$", re.IGNORECASE)

# Label statements of a Task 1-only output (module docstring, early exit). Quantifiers between
# the copula and the label are bounded: the pattern stays linear on hostile text.
_FILLER = (
    r"(?:therefore|thus|hence|clearly|inherently|likely|potentially|considered|deemed|classified"
    r"|categori[sz]ed|regarded|seen|viewed|labell?ed|interpreted|judged|also|generally|indeed"
    r"|highly|definitely|explicitly|directly|overall|ultimately|still|more|very|as)"
)
_STATEMENT = re.compile(
    rf"(?<![\w'])(?:is|are|be|been|was|were|as)\s+(?P<not>not\s+)?(?:{_FILLER}\s+){{0,3}}"
    rf"(?:an?\s+)?(?:[a-z-]+\s+(?:and|but)\s+)?(?:{_FILLER}\s+){{0,2}}"
    r"(?P<value>unharmful|harmful)\b(?!\s+(?:or|nor)\b)",
    re.IGNORECASE,
)
_NEGATED = re.compile(
    r"\b(?:not|cannot|never|neither|nor|no|if|whether|while|although|though)\b|n't\b", re.IGNORECASE
)
_HEDGED = re.compile(r"\b(?:could|might|may|would)\b", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[,;:(]")
_SENTENCE = re.compile(r"[^.!?\n]+")
_ABOUT_RESPONSE = re.compile(r"\b(?:response|assistant)\b", re.IGNORECASE)
_IN_QUOTES = re.compile(r"\"[^\"\n]*\"|\u201c[^\u201d\n]*\u201d")
_EARLY_TASK: Task = "request"

#: The parser's version, part of every cache key: a digest of this module's source, so that a
#: verdict read by another parser is never served from the cache.
PARSER_VERSION = "p-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

ConflictRule = Literal["harmful", "final"]
#: How a conflicting verdict's labels are resolved (module docstring; measured in the README).
CONFLICT_RULE: ConflictRule = "harmful"
#: The label a conflict resolves to under the ``harmful`` rule, per task.
_CONSERVATIVE: dict[Task, str] = {
    "request": "harmful",
    "completion": "compliance",
    "response": "harmful",
}

#: The shortest label text of an answer block that is checked as a quote without its header
#: (a lone ``Request: harmful`` is too common in user text to say the block was copied).
_MIN_LABELS_QUOTE = 24
_MARKDOWN = re.compile(r"[*_`#>]+")
_SPACE = re.compile(r"\s+")

_REFERENCE_TAIL = 300
_REFERENCE_PATTERNS: dict[Task, re.Pattern[str]] = {
    "request": re.compile(r"Request:\s*(harmful|unharmful)", re.IGNORECASE),
    "completion": re.compile(r"Completion:\s*(compliance|refusal)", re.IGNORECASE),
    "response": re.compile(r"Response:\s*(harmful|unharmful)", re.IGNORECASE),
}


def reference_labels(generated: str) -> dict[str, str | None]:
    """The paper's rule: each pattern searched in the last 300 characters (first match)."""
    tail = generated[-_REFERENCE_TAIL:]
    labels: dict[str, str | None] = {}
    for task, pattern in _REFERENCE_PATTERNS.items():
        match = pattern.search(tail)
        labels[task] = match.group(1).lower() if match else None
    return labels


@dataclass(frozen=True, slots=True)
class _Piece:
    """Something read from the output: its `text`, and the lines it was read from (`source`:
    the heading or header included), which a quote check compares with the user's texts; `at`:
    the index of its first line."""

    text: str
    source: str
    at: int = 0


@dataclass
class _Reading:
    """What one pass over the lines found; `closing`: the answer block that ends the text (no
    heading, conclusion or step after it), if one does; `loose`: lines of a task's first section
    under no step, conclusion or answers header (read only for a Task 1-only output)."""

    blocks: list[_Piece] = field(default_factory=list)
    conclusions: list[tuple[Task, _Piece]] = field(default_factory=list)
    steps: dict[Task, list[_Piece]] = field(default_factory=dict)
    closing: _Piece | None = None
    loose: dict[Task, list[_Piece]] = field(default_factory=dict)

    def without(self, quoted: Callable[[_Piece], bool]) -> tuple[_Reading, int]:
        """This reading less the pieces `quoted` says are quotes, and how many were."""
        blocks = [b for b in self.blocks if not quoted(b)]
        conclusions = [(t, c) for t, c in self.conclusions if not quoted(c)]
        steps = {t: [p for p in ps if not quoted(p)] for t, ps in self.steps.items()}
        dropped = (
            len(self.blocks)
            - len(blocks)
            + len(self.conclusions)
            - len(conclusions)
            + sum(len(ps) for ps in self.steps.values())
            - sum(len(ps) for ps in steps.values())
        )
        closing = self.closing if self.closing is not None and not quoted(self.closing) else None
        kept = {t: ps for t, ps in steps.items() if ps}
        return _Reading(blocks, conclusions, kept, closing, self.loose), dropped


def clean(text: str) -> str:
    """NFKC, with format characters (zero-width spaces and joiners, BOM, bidi marks) removed."""
    normal = unicodedata.normalize("NFKC", text)
    if normal.isascii():
        return normal
    return "".join(ch for ch in normal if unicodedata.category(ch) != "Cf")


def fold(text: str) -> str:
    """`text` as the quote check compares it (module docstring)."""
    return _SPACE.sub(" ", _MARKDOWN.sub(" ", clean(text).casefold())).strip()


def parse(
    generated: str,
    *,
    has_response: bool = True,
    quoted: Sequence[str | None] = (),
    conflicts: ConflictRule | None = None,
    early_exit: bool = False,
) -> Verdict:
    """The verdict in `generated` by the project's rule (module docstring); `quoted`: the user
    texts the model was given; `early_exit`: a prompt-only request's output may have been cut
    before the model's Task 2 (module docstring, early exit). Never raises."""
    text = clean(generated)
    quotes = _Quotes.of(quoted)
    rule = conflicts or CONFLICT_RULE
    if early_exit and not has_response:
        reading, dropped = _read(text, preamble=_EARLY_TASK).without(quotes.piece)
        if not _is_final_block(reading.closing):
            return _task1_verdict(reading, generated, dropped, rule, quotes)
    reading, dropped = _read(text).without(quotes.piece)
    tasks: tuple[Task, ...] = (
        ("request", "completion", "response") if has_response else ("request",)
    )
    final = _block_labels(reading.blocks[-1].text) if reading.blocks else {}
    labels: dict[Task, str | None] = {}
    recovered = conflicting = False
    for task in tasks:
        label = final.get(task)
        if label is None:
            label = _fallback(task, reading)
            recovered = recovered or label is not None
        stated = _stated(task, reading)
        if label is not None and stated - {label}:
            conflicting = True
            if rule == "harmful" and _CONSERVATIVE[task] in stated:
                label = _CONSERVATIVE[task]
        labels[task] = label
    source: LabelSource = "final"
    if not any(labels.values()):
        source = "unparsed"
    elif any(labels[task] is None for task in tasks):
        source = "incomplete"
    elif conflicting:
        source = "conflicting"
    elif recovered:
        source = "recovered"
    return Verdict.model_validate(
        {
            **labels,
            "reasoning": _reasoning(reading),
            "raw": generated,
            "found": source,
            "quoted": dropped,
        }
    )


def needs_full_output(verdict: Verdict) -> bool:
    """An early-exit verdict that cannot be trusted as it stands (its Task 1 did not state the
    request label cleanly): the guard generates its request again in full, without the stop
    string, and gives that verdict instead. A truncated one is not (the full generation would be
    cut at the same token), nor an engine error (the retries' business)."""
    return (
        verdict.early_exit
        and not verdict.trusted
        and not verdict.truncated
        and verdict.engine_error is None
    )


@dataclass(frozen=True, slots=True)
class _Quotes:
    """The user's texts the model saw, folded: what a piece or a sentence may be quoting."""

    haystacks: tuple[str, ...]

    @classmethod
    def of(cls, quoted: Sequence[str | None]) -> _Quotes:
        return cls(tuple(folded for text in quoted if text and (folded := fold(text))))

    def piece(self, piece: _Piece) -> bool:
        """Whether `piece` (its lines, or an answer block's labels alone) is a quote."""
        if not self.haystacks:
            return False
        needles = [fold(piece.source)]
        if _LABEL_LINE.match(piece.text):  # an answer block's labels: also without its header
            text = fold(piece.text)
            if len(text) >= _MIN_LABELS_QUOTE:
                needles.append(text)
        return any(needle and needle in hay for needle in needles for hay in self.haystacks)

    def sentence(self, text: str) -> bool:
        """Whether one sentence of the output occurs in the user's text."""
        needle = fold(text) if self.haystacks else ""
        return bool(needle) and any(needle in hay for hay in self.haystacks)


def _is_final_block(block: _Piece | None) -> bool:
    """A closing answer block that names the completion or the response: the model's final
    three-task block, so the output was not cut at Task 2."""
    if block is None:
        return False
    keys = {_task_of_key(m.group("key")) for m in _KEY_VALUE.finditer(block.text)}
    return bool(keys & {"completion", "response"})


def _task1_verdict(
    reading: _Reading, generated: str, dropped: int, rule: ConflictRule, quotes: _Quotes
) -> Verdict:
    """The verdict of a Task 1-only output (module docstring, early exit)."""
    task = _EARLY_TASK
    answered = [said for b in reading.blocks if (said := _block_labels(b.text).get(task))]
    concluded = [
        said
        for t, piece in reading.conclusions
        if t == task
        and (said := _concluded_label(task, piece.text) or _statement_label(piece.text, quotes))
    ]
    label: str | None
    if answered or concluded:  # rules 1 to 3: the last block's label, else the last conclusion's
        label = answered[-1] if answered else concluded[-1]
        stated = {*answered, *concluded}
    else:  # the label statements of Task 1's reasoning, its steps and loose lines in order
        prose = sorted(
            [*reading.steps.get(task, []), *reading.loose.get(task, [])], key=lambda p: p.at
        )
        statements = [found for piece in prose for found in _statements(piece.text, quotes)]
        firm = [value for value, hedged in statements if not hedged]
        label = firm[-1] if firm else None
        stated = {value for value, _ in statements}
    source: LabelSource = "recovered"
    if label is None:
        source = "unparsed"
    elif stated - {label}:
        source = "conflicting"
        if rule == "harmful" and _CONSERVATIVE[task] in stated:
            label = _CONSERVATIVE[task]
    reasoning = {t: r for t, r in _reasoning(reading).items() if t == task}
    return Verdict.model_validate(
        {
            task: label,
            "reasoning": reasoning,
            "raw": generated,
            "found": source,
            "quoted": dropped,
            "early_exit": True,
        }
    )


def _statement_label(text: str, quotes: _Quotes) -> str | None:
    """The last firm label statement of `text` (module docstring, early exit)."""
    firm = [value for value, hedged in _statements(text, quotes) if not hedged]
    return firm[-1] if firm else None


def _statements(text: str, quotes: _Quotes) -> list[tuple[str, bool]]:
    """Every label statement of `text`, in order: (label, hedged)."""
    found: list[tuple[str, bool]] = []
    for sentence in _SENTENCE.findall(_IN_QUOTES.sub(" ", text)):
        if "harmful" not in sentence.casefold() or _ABOUT_RESPONSE.search(sentence):
            continue
        said: list[tuple[str, bool]] = []
        for match in _STATEMENT.finditer(sentence):
            clause = _CLAUSE_BREAK.split(sentence[: match.start()])[-1]
            if _NEGATED.search(clause):
                continue
            value = match.group("value").lower()
            if match.group("not"):
                if value != "harmful":  # "is not unharmful": no statement
                    continue
                value = "unharmful"
            said.append((value, bool(_HEDGED.search(clause))))
        if said and not quotes.sentence(sentence):  # the quote check only where it matters
            found += said
    return found


def _stated(task: Task, reading: _Reading) -> set[str]:
    """Every label the model gave `task` in an answer block or a conclusion."""
    stated = {label for b in reading.blocks if (label := _block_labels(b.text).get(task))}
    for t, piece in reading.conclusions:
        if t == task and (label := _concluded_label(task, piece.text)) is not None:
            stated.add(label)
    return stated


def _fallback(task: Task, reading: _Reading) -> str | None:
    for block in reversed(reading.blocks[:-1]):
        label = _block_labels(block.text).get(task)
        if label is not None:
            return label
    concluded = [piece.text for t, piece in reading.conclusions if t == task]
    if not concluded:
        concluded = [piece.text for piece in reading.steps.get(task, [])[-1:]]
    for text in reversed(concluded):
        label = _concluded_label(task, text)
        if label is not None:
            return label
    return None


def _block_labels(block: str) -> dict[Task, str | None]:
    """First `Key: value` per task in one answer block; `None` values and labels of the wrong
    task count as no label."""
    labels: dict[Task, str | None] = {}
    for match in _KEY_VALUE.finditer(block):
        task = _task_of_key(match.group("key"))
        if task in labels:
            continue
        value = match.group("value").lower()
        labels[task] = value if value in TASK_LABELS[task] else None
    return labels


def _task_of_key(key: str) -> Task:
    lowered = key.lower()
    if lowered == "request":
        return "request"
    if lowered == "completion":
        return "completion"
    return "response"


def _concluded_label(task: Task, text: str) -> str | None:
    match = _CONCLUDED_LABEL.search(text)
    if match is None:
        return None
    value = match.group("value").lower()
    return value if value in TASK_LABELS[task] else None


def _read(text: str, *, preamble: Task | None = None) -> _Reading:
    """One pass over the lines: answer blocks, conclusions and reasoning steps. `preamble`: the
    task the lines before the first task heading belong to (none: they belong to no task)."""
    lines = text.splitlines()
    reading = _Reading()
    current: Task | None = None  # the task section the line is in
    collecting: Task | None = preamble  # only the first section of a task collects steps
    seen: set[Task] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _NOTABLE.match(line) or not line.strip():  # plain text, or blank
            if preamble is not None and collecting is not None and line.strip():
                reading.loose.setdefault(collecting, []).append(_Piece(line, line, i))
            i += 1
            continue
        start = i
        header = _HEADER.match(line)
        if header or _LABEL_LINE.match(line):
            first = (header.group("rest") or "") if header else line
            body, i = _paragraph(lines, i + 1, skip_blank=not first.strip())
            block = _Piece(_join(first, body), "\n".join(lines[start:i]))
            reading.blocks.append(block)
            reading.closing = block
            collecting = preamble if current is None else None
            continue
        if not _HEADING.match(line):
            if preamble is not None and collecting is not None:
                reading.loose.setdefault(collecting, []).append(_Piece(line, line, i))
            i += 1
            continue
        heading = line[:_MAX_HEADING]
        # Each pattern needs its word: look for the words first (casefold: case-insensitively,
        # as the patterns match), the patterns only where they are.
        folded = heading.casefold()
        conclusion = _CONCLUSION_HEADING.match(heading) if "conclusion" in folded else None
        task_heading = _TASK_HEADING.match(heading) if "task" in folded else None
        step = _STEP_HEADING.match(heading) if "reasoning step" in folded else None
        if not (conclusion or task_heading or step):
            i += 1
            continue
        reading.closing = None
        body, i = _paragraph(lines, i + 1, skip_blank=True)
        source = "\n".join(lines[start:i])
        if conclusion:
            task = _conclusion_task(conclusion, current if current is not None else preamble)
            if task is not None:
                piece = _Piece(_join(conclusion.group("rest"), body), source)
                reading.conclusions.append((task, piece))
        elif task_heading:
            current = _TASK_BY_NUMBER.get(int(task_heading.group("n")))
            collecting = current if current not in seen else None
            if current is not None:
                seen.add(current)
                rest = task_heading.group("rest")
                _task_heading_text(reading, current, rest, body, source, start)
        elif step and collecting is not None:
            piece = _Piece(_join(step.group("rest"), body), source, start)
            reading.steps.setdefault(collecting, []).append(piece)
    return reading


def _task_heading_text(
    reading: _Reading, task: Task, rest: str, body: list[str], source: str, at: int
) -> None:
    """``# Task 1: unharmful`` concludes; ``# Task 1\nThe user asks ...`` opens with a step."""
    if _BARE_LABEL.match(rest):
        reading.conclusions.append((task, _Piece(rest, source)))
    elif not rest.strip() and body:
        reading.steps.setdefault(task, []).append(_Piece(_join("", body), source, at))


def _conclusion_task(match: re.Match[str], current: Task | None) -> Task | None:
    named = _TASK_NUMBER.search(match.group("before") + " " + match.group("after"))
    if named:
        return _TASK_BY_NUMBER.get(int(named.group(1)))
    return current


def _paragraph(lines: list[str], start: int, *, skip_blank: bool) -> tuple[list[str], int]:
    """The lines from `start` up to a blank line, a heading, a ``---`` rule or an answers
    header (leading blank lines skipped when asked), and the index after them."""
    i = start
    if skip_blank:
        while i < len(lines) and not lines[i].strip():
            i += 1
    body: list[str] = []
    while i < len(lines):
        line = lines[i]
        if _NOTABLE.match(line) and (
            not line.strip() or _HEADING.match(line) or _HEADER.match(line) or _RULE.match(line)
        ):
            break
        body.append(line)
        i += 1
    return body, i


def _join(first: str, body: list[str]) -> str:
    return "\n".join(part for part in [first.strip(), *body] if part.strip()).strip()


def _reasoning(reading: _Reading) -> dict[Task, TaskReasoning]:
    reasoning: dict[Task, TaskReasoning] = {}
    for task in ("request", "completion", "response"):
        steps = [piece.text for piece in reading.steps.get(task, [])]
        conclusions = [piece.text for t, piece in reading.conclusions if t == task]
        if steps or conclusions:
            reasoning[task] = TaskReasoning(
                steps=steps, conclusion=conclusions[-1] if conclusions else None
            )
    return reasoning
