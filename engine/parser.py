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
    the heading or header included), which a quote check compares with the user's texts."""

    text: str
    source: str


@dataclass
class _Reading:
    """What one pass over the lines found."""

    blocks: list[_Piece] = field(default_factory=list)
    conclusions: list[tuple[Task, _Piece]] = field(default_factory=list)
    steps: dict[Task, list[_Piece]] = field(default_factory=dict)

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
        return _Reading(blocks, conclusions, {t: ps for t, ps in steps.items() if ps}), dropped


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
) -> Verdict:
    """The verdict in `generated` by the project's rule (module docstring); `quoted`: the user
    texts the model was given. Never raises."""
    reading, dropped = _read(clean(generated)).without(_quote_check(quoted))
    rule = conflicts or CONFLICT_RULE
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


def _quote_check(quoted: Sequence[str | None]) -> Callable[[_Piece], bool]:
    haystacks = [folded for text in quoted if text and (folded := fold(text))]
    if not haystacks:
        return lambda piece: False

    def is_quote(piece: _Piece) -> bool:
        needles = [fold(piece.source)]
        if _LABEL_LINE.match(piece.text):  # an answer block's labels: also without its header
            text = fold(piece.text)
            if len(text) >= _MIN_LABELS_QUOTE:
                needles.append(text)
        return any(needle and needle in hay for needle in needles for hay in haystacks)

    return is_quote


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


def _read(text: str) -> _Reading:
    """One pass over the lines: answer blocks, conclusions and reasoning steps."""
    lines = text.splitlines()
    reading = _Reading()
    current: Task | None = None  # the task section the line is in
    collecting: Task | None = None  # only the first section of a task collects steps
    seen: set[Task] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _NOTABLE.match(line) or not line.strip():  # plain text, or blank
            i += 1
            continue
        start = i
        header = _HEADER.match(line)
        if header or _LABEL_LINE.match(line):
            first = (header.group("rest") or "") if header else line
            body, i = _paragraph(lines, i + 1, skip_blank=not first.strip())
            reading.blocks.append(_Piece(_join(first, body), "\n".join(lines[start:i])))
            collecting = None
            continue
        if not _HEADING.match(line):
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
        body, i = _paragraph(lines, i + 1, skip_blank=True)
        source = "\n".join(lines[start:i])
        if conclusion:
            task = _conclusion_task(conclusion, current)
            if task is not None:
                piece = _Piece(_join(conclusion.group("rest"), body), source)
                reading.conclusions.append((task, piece))
        elif task_heading:
            current = _TASK_BY_NUMBER.get(int(task_heading.group("n")))
            collecting = current if current not in seen else None
            if current is not None:
                seen.add(current)
                _task_heading_text(reading, current, task_heading.group("rest"), body, source)
        elif step and collecting is not None:
            piece = _Piece(_join(step.group("rest"), body), source)
            reading.steps.setdefault(collecting, []).append(piece)
    return reading


def _task_heading_text(
    reading: _Reading, task: Task, rest: str, body: list[str], source: str
) -> None:
    """``# Task 1: unharmful`` concludes; ``# Task 1\nThe user asks ...`` opens with a step."""
    if _BARE_LABEL.match(rest):
        reading.conclusions.append((task, _Piece(rest, source)))
    elif not rest.strip() and body:
        reading.steps.setdefault(task, []).append(_Piece(_join("", body), source))


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
