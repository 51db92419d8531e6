"""A content-safety filter on generated text, applied while it is generated.

Categories are the data pipeline's format (moejax.data.stages: `harmful_categories`,
category -> words or regexes, case-insensitive, each word or phrase matched whole) plus its
classifier hook (`module:function` or a callable taking text and returning a reason or None). The
generator checks each row's text between decode chunks, so an action takes effect within a chunk of
the offending text:

  block   stop the row; the output ends before the first match    (finish_reason 'content_filter')
  redact  keep generating; every match is replaced by `redaction`
  refuse  stop the row; the whole output becomes `refusal`         (finish_reason 'content_filter')

A classifier verdict has no span: it covers the text generated since the previous check (the spans
are recorded as generation goes, so `redact` removes each flagged stretch). Counts per category are
returned with each completion. A streaming server holds back `holdback` characters so that text is
only sent once no later match can start inside it (moejax.serve).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable

from moejax.config import ConfigError
from moejax.data.stages import category_pattern

ACTIONS = ("block", "redact", "refuse")

# A small built-in list so that the server's filter is on by default; deployments pass their own
# categories (the same JSON a data preparation run uses) or a classifier.
DEFAULT_CATEGORIES = {
    "weapons": [
        r"build(ing)? an? (pipe )?bomb",
        r"make (a )?nerve agent",
        r"synthesi[sz]e (sarin|vx|ricin)",
    ],
    "self_harm": [r"kill yourself", r"how to commit suicide"],
    "malware": [r"write (a )?ransomware", r"keylogger that evades"],
}


@dataclasses.dataclass
class Match:
    category: str
    start: int
    end: int


class SafetyFilter:
    def __init__(
        self,
        categories: dict | None = None,
        classifier: str | Callable | None = None,
        action: str = "block",
        refusal: str = "I can't help with that.",
        redaction: str = "[redacted]",
        holdback: int = 64,
    ):
        if action not in ACTIONS:
            raise ConfigError(f"safety.action: must be one of {', '.join(ACTIONS)}, got {action!r}")
        self.categories = DEFAULT_CATEGORIES if categories is None else categories
        self.patterns = {
            cat: category_pattern(words) for cat, words in self.categories.items() if words
        }
        if (
            isinstance(classifier, str) and classifier
        ):  # the data pipeline's hook: "module:function"
            module, _, fn = classifier.partition(":")
            classifier = getattr(importlib.import_module(module), fn)
        self.classifier = classifier or None
        self.action, self.refusal, self.redaction, self.holdback = (
            action,
            refusal,
            redaction,
            holdback,
        )

    @classmethod
    def from_file(cls, path: str, **kw) -> SafetyFilter:
        """Categories from a JSON file {category: [words or regexes]}."""
        with open(path) as f:
            cats = json.load(f)
        if not isinstance(cats, dict) or not all(isinstance(v, list) for v in cats.values()):
            raise ConfigError(f"{path}: expected a JSON object {{category: [words or regexes]}}")
        return cls(cats, **kw)

    def pattern_matches(self, text: str) -> list[Match]:
        return [
            Match(cat, m.start(), m.end())
            for cat, pat in self.patterns.items()
            for m in pat.finditer(text)
        ]

    def classify(self, text: str, since: int = 0) -> Match | None:
        """The classifier's verdict on the text, as a span over text[since:] (what it had not
        seen)."""
        if self.classifier is None or len(text) <= since:
            return None
        verdict = self.classifier(text)
        return Match(str(verdict), since, len(text)) if verdict else None

    def stops(self, text: str, flagged=()) -> bool:
        """Whether this text ends the row (block / refuse, and a pattern matched or the classifier
        flagged)."""
        return self.action != "redact" and bool(flagged or self.pattern_matches(text))

    def apply(self, text: str, flagged=()) -> tuple[str, dict[str, int], bool]:
        """(text after the action, counts per category, whether the row was filtered). flagged:
        classifier spans recorded while generating (clipped to the text)."""
        found = self.pattern_matches(text) + [
            Match(m.category, m.start, min(m.end, len(text)))
            for m in flagged
            if m.start < len(text)
        ]
        found.sort(key=lambda m: (m.start, m.end))
        counts: dict[str, int] = {}
        for m in found:
            counts[m.category] = counts.get(m.category, 0) + 1
        if not found:
            return text, counts, False
        if self.action == "refuse":
            return self.refusal, counts, True
        if self.action == "block":
            return text[: found[0].start], counts, True
        pieces, at = [], 0
        for m in found:  # redact: merge overlapping spans
            if m.start >= at:
                pieces.append(text[at : m.start] + self.redaction)
                at = m.end
            elif m.end > at:
                at = m.end
        return "".join(pieces) + text[at:], counts, False
