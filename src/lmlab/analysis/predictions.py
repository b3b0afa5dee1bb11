"""What the researcher predicted about instability, read from their own words, against what the
runs did: "the no-warmup arm shows more loss spikes" when the spikes were all in the warmup
arm is a contradiction the report must state, not leave to the reader.

The prediction and every expected outcome are cut into clauses (at sentence ends, semicolons,
"but" and "while"); a clause that names an instability (loss spikes, divergence, NaN, or
instability in general) is matched to the arms it names ("neither arm", "both arms" and "no
arm" name them all) and read as predicting the events present, absent ("no", "not", "never",
"neither", "without", "stable"), more frequent than in the other arms ("more", "larger",
"higher") or only possible ("possibly", "may", "might", "could"). This is a reading of prose,
so the report quotes the clause it read; the checks remain the exact form.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from lmlab.analysis.summary import Experiment
from lmlab.names import Event

Expect = Literal["present", "absent", "more", "possible"]
KINDS: dict[str, tuple[str, ...]] = {
    "spike": (str(Event.SPIKE),),
    "divergence": (str(Event.DIVERGENCE), str(Event.NAN)),
    "nan": (str(Event.NAN),),
    "instability": (str(Event.SPIKE), str(Event.DIVERGENCE), str(Event.NAN)),
}
_KIND_WORDS = (("spike", r"spik"), ("divergence", r"diverg|blow[s -]?up|blew up"),
               ("nan", r"\bnans?\b|non-finite"), ("instability", r"unstabl|instabilit"))
_NEGATION = re.compile(r"\b(no|not|never|neither|nor|without|none|stable|stably)\b|n't\b")
_MORE = re.compile(r"\b(more|larger|higher|bigger|most|frequent)\b")
_HEDGE = re.compile(r"\b(possibly|perhaps|may|might|could|maybe)\b")
_ALL_ARMS = re.compile(r"\b(neither|both|either|no|every|all|each)\s+arms?\b")


@dataclass(frozen=True)
class PredictedInstability:
    clause: str
    kind: str  # a key of KINDS
    arms: tuple[str, ...]  # the arms the clause is about
    expect: Expect
    seen: dict[str, int]  # every arm -> its events of this kind, summed over seeds
    versus: tuple[str, ...] = ()  # "more than" these arms (default: every other arm)

    @property
    def seen_in(self) -> tuple[str, ...]:
        return tuple(arm for arm, n in self.seen.items() if n)

    @property
    def agrees(self) -> bool | None:
        """Whether the runs did what the clause said (None: a hedged "possibly")."""
        mine = [self.seen[a] for a in self.arms]
        others = [n for a, n in self.seen.items()
                  if a not in self.arms and (not self.versus or a in self.versus)]
        if self.expect == "present":
            return all(mine)
        if self.expect == "absent":
            return not any(mine)
        if self.expect == "more":
            return bool(others) and min(mine) > max(others)
        return None


def clauses(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;])\s+|;\s*|,?\s+\b(?:but|while|whereas)\b\s+", text)
    return [p.strip(" ,.") for p in parts if p and p.strip(" ,.")]


def _arm_pattern(arm: str) -> re.Pattern[str]:
    # "no_warmup" is also written "no-warmup" or "no warmup".
    words = [re.escape(w) for w in re.split(r"[_\-\s]+", arm) if w]
    return re.compile(r"(?<![\w-])" + r"[_\-\s]?".join(words) + r"(?![\w-])", re.IGNORECASE)


def read_clause(clause: str, arms: list[str]
                ) -> tuple[str, tuple[str, ...], Expect, tuple[str, ...]] | None:
    """(kind, the arms it is about, what it expects of them, the arms they are compared with
    in "more ... than ...")."""
    low = clause.lower()
    kind = next((k for k, pattern in _KIND_WORDS if re.search(pattern, low)), None)
    if kind is None:
        return None
    head, _, tail = clause.partition(" than ")
    if tail and _MORE.search(head.lower()) and not _NEGATION.search(head.lower()):
        subject = tuple(a for a in arms if _arm_pattern(a).search(head))
        versus = tuple(a for a in arms if _arm_pattern(a).search(tail) and a not in subject)
        if subject:
            return kind, subject, "more", versus
    named = tuple(a for a in arms if _arm_pattern(a).search(clause))
    if _ALL_ARMS.search(low) or not named:
        if not _ALL_ARMS.search(low) and len(arms) > 1:
            return None  # an instability, but about no arm we can tell
        named = tuple(arms)
    # Remove the arm names before looking for a negation: "no_warmup" is not "no".
    rest = low
    for a in named:
        rest = _arm_pattern(a).sub(" ", rest)
    expect: Expect = ("possible" if _HEDGE.search(rest) else
                      "absent" if _NEGATION.search(rest) else
                      "more" if _MORE.search(rest) and len(named) < len(arms) else "present")
    return kind, named, expect, ()


def predicted_instability(exp: Experiment) -> list[PredictedInstability]:
    if exp.spec is None or not exp.arms:
        return []
    texts = [exp.spec.hypothesis.prediction] + [o.outcome for o in exp.spec.outcomes]
    counts = {arm: Counter(e["kind"] for r in exp.runs_of(arm) for e in r.events)
              for arm in exp.arms}
    out = []
    for text in texts:
        for clause in clauses(text):
            read = read_clause(clause, exp.arms)
            if read is None:
                continue
            kind, named, expect, versus = read
            seen = {arm: sum(c.get(k, 0) for k in KINDS[kind]) for arm, c in counts.items()}
            found = PredictedInstability(clause, kind, named, expect, seen, versus)
            if found not in out:  # the prediction and an expected outcome may say it twice
                out.append(found)
    return out
