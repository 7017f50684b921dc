"""The boxed-answer verifier against adversarial completions: only the final \\boxed{} counts.

    python tests/test_verifier.py      # prints the table (used in the issue's report)
"""

import pytest

from stages.verify import extract_gold, grade, last_boxed

# (what it probes, completion, gold answer, expected reward with answer_format=boxed)
CASES = [
    ("bare number, no box", "42", "42", 0.0),
    ("gold number in noise, no box", "7 13 42 99 100 x=42 so 42", "42", 0.0),
    ("number after 'answer is', no box", "The answer is 42.", "42", 0.0),
    ("boxed, correct", "so \\boxed{42}", "42", 1.0),
    ("boxed, wrong", "so \\boxed{41}", "42", 0.0),
    ("several boxes, last correct", "\\boxed{41} no wait \\boxed{42}", "42", 1.0),
    ("several boxes, only an earlier one correct", "\\boxed{42} no wait \\boxed{41}", "42", 0.0),
    ("box spray, gold not last", "".join(f"\\boxed{{{i}}}" for i in range(100)), "42", 0.0),
    ("many answers in one box", "\\boxed{40, 41, 42, 43}", "42", 0.0),
    ("'or' inside the box", "\\boxed{42 \\text{ or } 43}", "42", 0.0),
    ("empty box", "\\boxed{} 42", "42", 0.0),
    ("unclosed box", "\\boxed{42", "42", 0.0),
    ("closed box then unclosed box", "\\boxed{42} then \\boxed{4", "42", 0.0),
    ("\\boxed without braces", "\\boxed 42", "42", 0.0),
    ("gold outside, wrong box", "42 is tempting but \\boxed{41}", "42", 0.0),
    ("box inside text", "We get $\\boxed{42}$ apples in total.", "42", 1.0),
    ("box inside \\text{}", "\\text{the answer: \\boxed{42}}", "42", 1.0),
    ("nested braces", "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("nested braces, wrong", "\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{2}", 0.0),
    ("unit as \\text{} after the number", "\\boxed{42 \\text{ cm}}", "42", 1.0),
    ("unit, number inside \\text{}", "\\boxed{\\text{42 cm}}", "42", 0.0),
    ("\\text{} answer", "\\boxed{\\text{42}}", "42", 1.0),
    ("thin space thousands 10\\,000", "\\boxed{10\\,000}", "10000", 1.0),
    ("thin space, gold with thin space", "\\boxed{10000}", "10\\,000", 1.0),
    ("{,} thousands", "\\boxed{10{,}000}", "10000", 1.0),
    ("comma thousands 1,000", "\\boxed{1,000}", "1000", 1.0),
    ("\\dfrac = \\frac", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("decimal = fraction", "\\boxed{0.75}", "\\frac{3}{4}", 1.0),
    ("unsimplified fraction", "\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", 1.0),
    ("negative number", "\\boxed{-3}", "-3", 1.0),
    ("sign dropped", "\\boxed{3}", "-3", 0.0),
    ("negative, wrong sign", "\\boxed{-3}", "3", 0.0),
    ("percent sign", "\\boxed{42\\%}", "42", 1.0),
    ("x = answer", "\\boxed{x = 42}", "42", 1.0),
    ("\\fbox", "\\fbox{42}", "42", 1.0),
    ("set with literal braces", "\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
]


@pytest.mark.parametrize("what,completion,gold,expected", CASES, ids=[c[0] for c in CASES])
def test_adversarial_completions(what, completion, gold, expected):
    assert grade(completion, gold) == expected


def test_answer_format_any_relaxes_to_any_expression():
    assert grade("The answer is 42.", "42", "any") == 1.0
    assert grade("The answer is 42.", "42", "boxed") == 0.0


def test_last_boxed_and_gold_extraction():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{ }") is None
    assert extract_gold("So the total is $\\boxed{\\frac{3}{4}}$.", "boxed") == "\\frac{3}{4}"
    assert extract_gold("She pays 3 + 4 = 7 dollars.\n#### 1,007", "gsm8k") == "1007"
    assert extract_gold("no marker", "gsm8k") is None
    assert extract_gold(" 5 ", "plain") == "5"


if __name__ == "__main__":
    # answer_format any = math-verify's default extraction, which is what math_jsonl rewarded before
    print("| case | completion | gold | boxed (default) | any |\n|---|---|---|---|---|")
    for what, completion, gold, _ in CASES:
        print(
            f"| {what} | `{completion[:60]}` | `{gold}` | {grade(completion, gold):.0f} | {grade(completion, gold, 'any'):.0f} |"
        )
