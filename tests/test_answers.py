"""The verifier's answers: what a reply states, and whether it matches the reference. A reply that states no
answer, or several different ones, never scores; ordinary working before the answer does not confuse it."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from stages.core import answers


@pytest.mark.parametrize("reply, expected", [
    ("The answer is 85.", "85"),
    ("3 + 5 = 8", "8"),
    ("1+16 = 17", "17"),
    ("47 + 38 = 85", "85"),
    ("7 + 8 = 15, carry 1, so 85", "85"),
    ("Sam has 3 apples and buys 5 more, so he has 8 apples.", "8"),
    ("She sold 170/2 = 85 clips.", "85"),
    ("The total is 1,234 dollars.", "1234"),
    ("Altogether $1,234,567.50 was raised.", "1234567.50"),
    ("The temperature fell to -7.", "-7"),
    ("So x = -3", "-3"),
    ("Subtracting, 90 - 5 leaves 85", "85"),
    ("the answer is \u22124", "-4"),
    ("It weighs 85.0 kg", "85.0"),
    ("The answer is 85. Hope this helps!", "85"),
    ("What is 47 + 38?", "38"),  # restating the question: its last number, which then scores 0
    ("**85**", "85"),
])
def test_last_number(reply, expected):
    assert answers.extract(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    (r"So the result is \boxed{85}.", "85"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{2\pi}", r"2\pi"),
    (r"\boxed{5!}", "5!"),  # a factorial, not an exclamation
    (r"The answer is \boxed 7", "7"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{47+38=85}", "85"),
    (r"\boxed{\text{85 apples}}", "85"),
    ("Working: 6 * 7 = 42, then 42 / 6 = 7\n#### 42", "42"),
    ("#### \\$1,234", "1234"),
    ("<answer>42</answer>", "42"),
    ("<answer>The answer is 85</answer>", "85"),
    ("<answer>The answer is 85!</answer>", "85"),
    (r"<answer>\boxed{85}</answer>", "85"),
    ("<think>3 + 4 = 7, so 7?</think><answer>42</answer>", "42"),
    (r"<think>maybe \boxed{7}</think>It is \boxed{42}", "42"),
    ("<think>7 is close</think>\nThe answer is 42.", "42"),
    ("Without the opening tag, 7 + 1 = 8</think>The answer is 42.", "42"),
    (r"<answer>42</answer> since 40 + 2 = 42 and \boxed{42.0}", "42"),
    (r"\boxed{85} and so 84 is wrong", "85"),  # a marked answer beats the last number
])
def test_marked_answer(reply, expected):
    assert answers.extract(reply) == expected


@pytest.mark.parametrize("reply", [
    "",
    "   \n\t ",
    "no numbers here",
    r"\boxed{84} or maybe \boxed{85}",
    "<answer>84</answer> <answer>85</answer>",
    "\\boxed{85}\n#### 84",
    r"\boxed{84 or 85}",
    "<answer></answer> 85",
    "It is 84 or 85.",
    "The answer is 84 or maybe 85.",
    "So x = 84 or x = 85",
    "It is 84/85.",
    "It is between 84 and 86.",
    "Somewhere between 84 apples and 86 apples",
    "It's 84-86.",
    "It's 84 \u2013 86.",
    "<think>47 + 38 = 85, so 85",  # reasoning never closed: no answer stated
    "<think>85</think>   ",
])
def test_no_single_answer_is_none(reply):
    assert answers.extract(reply) is None


def test_whole_mode_is_the_trimmed_reply():
    assert answers.extract("  64 \n", "whole") == "64"
    assert answers.extract("The answer is 64", "whole") == "The answer is 64"
    assert answers.extract(" \n ", "whole") is None


@pytest.mark.parametrize("predicted, reference, compare, same", [
    ("85", "85.0", "math", True),
    ("85.00", "85", "math", True),
    ("85", "85.0", "exact", False),
    ("85", "84", "math", False),
    ("1,234", "1234", "exact", True),
    ("1234", "1,234", "math", True),
    (r"\frac{1}{2}", "0.5", "math", True),
    ("0.5", "1/2", "math", True),
    (r"\frac{1}{2}", "0.5", "exact", False),
    (r"\frac{2}{3}", "0.5", "math", False),
    ("0.333333", "1/3", "math", False),  # fractions compare by value: a rounded decimal is not the fraction
    (r"-\dfrac34", "-0.75", "math", True),
    (r"2\sqrt{2}", r"\sqrt{8}", "math", True),
    ("1.41421356", r"\sqrt{2}", "math", True),  # math_verify: an irrational to 6 decimal places
    ("1.414", r"\sqrt{2}", "math", False),
    ("x^2+1", "1+x^2", "math", True),
    ("2x+1", "y = 2x + 1", "math", True),
    ("0.1000000000001", "0.1", "math", True),
    ("0.1001", "0.1", "math", False),
    ("12345678901234567891", "12345678901234567890", "math", False),  # large integers compare exactly
    (r"2\,000", "2000", "math", True),
    ("-3", "-3.0", "math", True),
    ("-3", "3", "math", False),
    ("\u22123", "-3", "math", True),
    ("banana", "banana", "math", True),  # cannot be parsed: string equality
    ("no", "on", "math", False),  # math_verify alone reads both as the product n*o
    ("32 32", "64", "math", False),  # math_verify alone reads this as 32 + 32
    ("", "", "math", False),
    ("", "", "exact", False),
])
def test_equal(predicted, reference, compare, same):
    assert answers.equal(predicted, reference, compare) is same


@pytest.mark.parametrize("reply, reference, score", [
    ("The answer is 85.", "85", 1.0),
    ("The answer is 85.0.", "85", 1.0),
    ("47 + 38 = 85", "85", 1.0),
    ("The answer is 84.", "85", 0.0),
    (r"So \boxed{85}", "85", 1.0),
    (r"So \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"So \boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("Half of it\n#### 42", "42", 1.0),
    ("<think>7</think><answer>42</answer>", "42", 1.0),
    ("The total is 1,234 dollars.", "1234", 1.0),
    ("It dropped to -7 degrees.", "-7", 1.0),
    (r"\boxed{84} or maybe \boxed{85}", "85", 0.0),  # conflicting boxed answers
    ("It is 84 or 85.", "85", 0.0),
    ("It is between 84 and 86.", "85", 0.0),
    ("It is between 84 and 86.", "86", 0.0),
    ("", "85", 0.0),
    ("   ", "85", 0.0),
    ("What is 47 + 38?", "85", 0.0),  # restating the question
    ("I don't know.", "85", 0.0),
    ("85", 85, 1.0),  # an integer answer column
])
def test_check(reply, reference, score):
    assert answers.check(reply, reference) == score


def test_check_without_reference_is_none():
    assert answers.check("The answer is 85.", None) is None
    assert answers.check("", None, "whole", "exact") is None


@pytest.mark.parametrize("reply, reference, score", [
    ("64", "64", 1.0),
    (" 64\n", "64", 1.0),
    ("64 64", "64", 0.0),
    ("The answer is 64", "64", 0.0),
    ("46", "64", 0.0),
    ("", "64", 0.0),
    ("  ", "64", 0.0),
])
def test_whole_mode_exact_match(reply, reference, score):
    assert answers.check(reply, reference, "whole", "exact") == score


@pytest.mark.parametrize("reference, math, exact", [
    ("85", True, True),
    ("-3.5", True, True),
    ("1,234", True, True),
    (r"\frac{1}{2}", True, True),
    ("x^2+1", True, True),
    (r"\text{Monday}", True, True),
    ("", False, False),
    ("   ", False, True),
    ("banana", False, True),
    ("84 or 85", False, True),
    (r"9^{9^{9}}", False, True),  # would take sympy minutes: not compared as math
])
def test_parses(reference, math, exact):
    assert answers.parses(reference, "math") is math
    assert answers.parses(reference, "exact") is (exact and bool(reference.strip()))


@pytest.mark.parametrize("call", [
    lambda: answers.extract("85", "last"),
    lambda: answers.equal("85", "85", "fuzzy"),
    lambda: answers.check("85", "85", "whole", "fuzzy"),
    lambda: answers.parses("85", "fuzzy"),
])
def test_unknown_modes_are_rejected(call):
    with pytest.raises(ValueError):
        call()


def test_math_comparison_works_off_the_main_thread():
    """math_verify's default timeouts use signal.alarm, which raises outside the main thread."""
    results, errors = [], []

    def work():
        try:
            results.append(answers.check(r"\boxed{2\sqrt{2}}", r"\sqrt{8}"))
        except Exception as e:  # noqa: BLE001 - the failure is what the test reports
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert errors == [] and results == [1.0]


def test_costly_expressions_do_not_hang():
    """Without timeouts sympy would try to evaluate 9^(9^9); the guard compares such text as a string."""
    code = "from stages.core import answers; print(answers.check(r'\\boxed{9^{9^{9}}}', '5'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0.0"


def test_import_is_cheap():
    """math_verify (and sympy behind it) load only when a comparison needs them."""
    code = "import sys; from stages.core import answers; print('math_verify' in sys.modules, 'sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False"
