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
`found` is ``"final"`` when every label came from step 1, ``"recovered"`` when any came from
steps 2 to 4, and ``"unparsed"`` when there is no label at all. Partial or garbage text is
parsed as far as it goes; parsing never raises. `truncated` is left to the caller.

`reference_labels` is the paper's rule instead: the three patterns searched in the last 300
characters only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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


@dataclass
class _Reading:
    """What one pass over the lines found."""

    blocks: list[str] = field(default_factory=list)
    conclusions: list[tuple[Task, str]] = field(default_factory=list)
    steps: dict[Task, list[str]] = field(default_factory=dict)


def parse(generated: str, *, has_response: bool = True) -> Verdict:
    """The verdict in `generated` by the project's rule (module docstring). Never raises."""
    reading = _read(generated)
    tasks: tuple[Task, ...] = (
        ("request", "completion", "response") if has_response else ("request",)
    )
    final = _block_labels(reading.blocks[-1]) if reading.blocks else {}
    labels: dict[Task, str | None] = {}
    recovered = False
    for task in tasks:
        label = final.get(task)
        if label is None:
            label = _fallback(task, reading)
            recovered = recovered or label is not None
        labels[task] = label
    source: LabelSource = "recovered" if recovered else "final"
    if not any(labels.values()):
        source = "unparsed"
    return Verdict.model_validate(
        {
            **labels,
            "reasoning": _reasoning(reading),
            "raw": generated,
            "found": source,
        }
    )


def _fallback(task: Task, reading: _Reading) -> str | None:
    for block in reversed(reading.blocks[:-1]):
        label = _block_labels(block).get(task)
        if label is not None:
            return label
    concluded = [text for t, text in reading.conclusions if t == task]
    if not concluded:
        concluded = reading.steps.get(task, [])[-1:]
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
        header = _HEADER.match(line)
        if header or _LABEL_LINE.match(line):
            first = (header.group("rest") or "") if header else line
            body, i = _paragraph(lines, i + 1, skip_blank=not first.strip())
            reading.blocks.append(_join(first, body))
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
        if conclusion:
            task = _conclusion_task(conclusion, current)
            if task is not None:
                reading.conclusions.append((task, _join(conclusion.group("rest"), body)))
        elif task_heading:
            current = _TASK_BY_NUMBER.get(int(task_heading.group("n")))
            collecting = current if current not in seen else None
            if current is not None:
                seen.add(current)
                _task_heading_text(reading, current, task_heading.group("rest"), body)
        elif step and collecting is not None:
            reading.steps.setdefault(collecting, []).append(_join(step.group("rest"), body))
    return reading


def _task_heading_text(reading: _Reading, task: Task, rest: str, body: list[str]) -> None:
    """``# Task 1: unharmful`` concludes; ``# Task 1\nThe user asks ...`` opens with a step."""
    if _BARE_LABEL.match(rest):
        reading.conclusions.append((task, rest))
    elif not rest.strip() and body:
        reading.steps.setdefault(task, []).append(_join("", body))


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
        steps = reading.steps.get(task, [])
        conclusions = [text for t, text in reading.conclusions if t == task]
        if steps or conclusions:
            reasoning[task] = TaskReasoning(
                steps=steps, conclusion=conclusions[-1] if conclusions else None
            )
    return reasoning
