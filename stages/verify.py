"""The answer verifier for math tasks: only the final ``\\boxed{...}`` counts.

A reward that accepts any number anywhere in a completion can be hacked (a policy learns to spray
numbers; a random model's gibberish that happens to contain the gold number scores 1). By default
(``task.answer_format: boxed``) the answer is the content of the LAST ``\\boxed{...}`` with balanced
braces; no box, an empty box, an unclosed box or ``\\boxed`` without braces scores 0. That content is
compared with the gold answer by math-verify (``\\dfrac`` = ``\\frac`` = 0.5, ``1,000`` = 1000,
units in ``\\text{}`` after the number ignored). ``answer_format: any`` relaxes this to math-verify's
default extraction from the whole completion (boxed first, then any expression).
"""

from __future__ import annotations

import functools
import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*{")
# digit groups written with a thin space, a negative thin space or {,}: 10\,000, 10\!000, 10{,}000
_GROUP_SEP = re.compile(r"(?<=\d)(?:\\[,!;: ]|\\thinspace|\{,\}|~)\s*(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None when there is no closed,
    non-empty one. A later unclosed box makes the whole answer invalid: the final answer is unclear."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # \{ and \} are literal braces (sets), not grouping
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip() or None
        i += 1
    return None


def normalize(answer: str) -> str:
    """Digit-group separators math-verify does not read (``10\\,000`` would parse as 10*0)."""
    return _GROUP_SEP.sub("", answer)


def extract_gold(solution: str, how: str) -> str | None:
    """The gold answer from a dataset field: ``plain`` (the field is the answer), ``boxed`` (the last
    ``\\boxed{}`` of a worked solution, as in MATH), ``gsm8k`` (the text after ``####``)."""
    solution = str(solution)
    if how == "boxed":
        return last_boxed(solution)
    if how == "gsm8k":
        if "####" not in solution:
            return None
        return solution.rsplit("####", 1)[1].strip().replace(",", "") or None
    return solution.strip() or None


@functools.lru_cache(maxsize=65536)
def _parse_gold(gold: str):
    from math_verify import parse

    return parse(f"\\boxed{{{normalize(gold)}}}")


def grade(completion: str, gold: str, answer_format: str = "boxed") -> float:
    """1.0 when the completion's final answer equals ``gold`` (math-verify), else 0.0."""
    from math_verify import LatexExtractionConfig, parse, verify

    content = last_boxed(completion) if answer_format == "boxed" else None
    if answer_format == "boxed" and content is None:
        return 0.0
    gold_parsed = _parse_gold(gold)  # the same golds are scored G times a step: parsed once
    if not gold_parsed:
        return 0.0
    if answer_format == "boxed":
        # only the boxed content is parsed: nothing outside the box can match
        pred = parse(f"\\boxed{{{normalize(content)}}}",
                     extraction_config=[LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=True)])
    else:
        pred = parse(normalize(completion))
    return float(bool(pred) and verify(gold_parsed, pred))
