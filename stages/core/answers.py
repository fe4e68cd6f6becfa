"""The verifier's answers: the final answer a chat reply states, and whether it matches the reference.

A reference answer is one number or one short math expression. Extraction (`extract`) has two modes:

- "whole": the whole reply, whitespace-trimmed, is the answer (empty → None). The embedded task's exact match.
- "auto": the answer the reply marks, else its last number. Reasoning is not the answer: text up to the last
  `</think>` is dropped, and a `<think>` that is never closed means the reply stated no answer (None).
  Marked answers, in priority order: `<answer>…</answer>` tags, `\\boxed{…}` (nested braces allowed, also
  `\\fbox`), a final `#### X` line (GSM8K). A marked content is reduced to its number when it holds exactly one
  number among words (`The answer is 85` → `85`, `\\$1,234` → `1234`), to its right-hand side when it is
  working or an assignment (`47 + 38 = 85` → `85`, `x = 5` → `5`), and otherwise kept as written
  (`\\frac{1}{2}`). When nothing is marked, the answer is the last number: integers, decimals, negatives, `1,234`
  → `1234`; a trailing period is not part of it. Only numbers are read there: an unmarked `$\\frac{1}{2}$` reads
  as 2.

Several different candidates never score by luck, so extract returns None when
- the marked answers (all tags, all boxed and all #### lines together) differ after reduction, or one of them
  hedges (`\\boxed{84 or 85}`) or is empty;
- in last-number mode, the sentence of the last number hedges between different numbers: `84 or 85`,
  `between 84 and 86`, or a last number joined to the one before it by `/` or a dash (`84/85`, a range
  `84-86`). Working is not a hedge (`170/2 = 85`, `90 - 5 leaves 85`); an unmarked fraction like `3/4` is.

Comparison (`equal`) has two modes:

- "exact": string equality after trimming and removing thousands separators (`85.0` is not `85`).
- "math": both sides are first reduced like a marked answer. Two plain numbers or fractions of integers compare by
  value, without sympy (integers exactly; otherwise within 1e-9 relative to the reference): `85` == `85.0`,
  `\\frac{1}{2}` == `0.5`, but `0.333333` != `1/3` (math_verify alone rounds to 6 places). Otherwise
  `math_verify` parses both sides as LaTeX/expressions and decides (`2\\sqrt{2}` == `\\sqrt{8}`,
  `y = 2x+1` == `2x+1`, `1.41421356` == `\\sqrt{2}` to its 6 places). It is not asked about text it would
  misread: prose (`banana` would parse as the product a*a*a*b*n*n, so `no` would equal `on`), numbers separated
  by spaces (`32 32` would parse as 64) and expressions that could take sympy minutes (power towers, huge
  exponents or factorials, over 200 characters); those, and whatever it cannot parse, compare as trimmed strings.

`math_verify` runs without its timeouts: by default it arms `signal.alarm`, which fails outside the main thread
(and cannot interrupt a long C-level computation anyway), hence the guard against costly expressions. It is
imported lazily, and parsed answers and comparisons are cached since each reference is compared many times.

`check` scores one reply: 1.0 right, 0.0 wrong, absent or ambiguous, None when there is no reference.
`parses` says whether a reference can be compared at all: under "exact" it is non-empty after trimming; under
"math" it is a plain number or something `math_verify` turns into a value (not prose, not a hedge, not empty).
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

EXTRACT_MODES = ("whole", "auto")
COMPARE_MODES = ("math", "exact")

_NUM = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
# A number in running text: a minus is a sign only where it cannot be subtraction (not after a word or a closer).
_NUMBER = re.compile(rf"(?:(?<![\w.)\]}}])-|(?<![\w.])){_NUM}", re.ASCII)
_PLAIN_NUMBER = re.compile(rf"[+-]?(?:{_NUM}|\.[0-9]+)", re.ASCII)
_INTEGER_ARG = r"(?:\{\s*(-?[0-9]+)\s*\}|([0-9]))"  # \frac{12}{5} or \frac12
_FRACTION = re.compile(rf"(-)?\s*(?:\\[dt]?frac\s*{_INTEGER_ARG}\s*{_INTEGER_ARG}|([0-9]+)\s*/\s*([0-9]+))", re.ASCII)
_SEPARATED = re.compile(r"(?<![0-9,.])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9]|,[0-9])")
_LATEX_THIN_SPACE = re.compile(r"(?<=[0-9])\\[,!; ](?=[0-9]{3}(?![0-9]))")

_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_HASHES = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_THINK_OPEN, _THINK_CLOSE = re.compile(r"<think>", re.IGNORECASE), re.compile(r"</think>", re.IGNORECASE)
_DELIMITED = re.compile(r"^(?:\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\])$", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_TEXT_ESCAPE = re.compile(r"\\[$%,;:! ]|~")
_PROSE_CHARS = re.compile(r"[A-Za-z\s.,:;?'\"*$€£%()]*")
_LETTER_RUN = re.compile(r"[A-Za-z]+")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_EQUALS = re.compile(r"(?<![<>!=\\])=(?!=)")
_ARITHMETIC = re.compile(r"[0-9\s.,+\-*/×÷()^{}]*")
_VARIABLE = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*")
_ARITHMETIC_COMMAND = re.compile(r"\\(?:times|cdot|div|frac|dfrac|tfrac|left|right)")
_SPACED_DIGITS = re.compile(r"[0-9]\s+[0-9]")

_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc sinh cosh tanh arcsin arccos arctan log ln exp sqrt lim max min gcd lcm mod det "
    "deg pi oo".split())
_SHORT_WORDS = frozenset("is or no on of to in it an as at by if so be we do go am me my up us".split())
_MAX_MATH_CHARS = 200


def extract(reply: str, mode: str = "auto") -> str | None:
    """The final answer a reply states, or None when it states none or several different ones."""
    _require(mode, EXTRACT_MODES, "extract mode")
    if mode == "whole":
        return (reply or "").strip() or None
    text = _after_reasoning(reply or "").replace("\u2212", "-")
    if not text.strip():
        return None
    marked = _marked_answers(text)
    if marked is None:
        return _last_number(text)
    return _agreed(marked)


def equal(predicted: str, reference: str, compare: str = "math") -> bool:
    """Whether two extracted answers are the same."""
    _require(compare, COMPARE_MODES, "compare mode")
    if compare == "exact":
        p, r = _exact_form(str(predicted)), _exact_form(str(reference))
        return bool(p) and p == r
    return _equal_math(str(predicted).strip(), str(reference).strip())


def check(reply: str, reference: str | None, extract_mode: str = "auto", compare: str = "math") -> float | None:
    """1.0 correct, 0.0 wrong/absent/ambiguous, None when there is no reference (cannot check)."""
    _require(extract_mode, EXTRACT_MODES, "extract mode")
    _require(compare, COMPARE_MODES, "compare mode")
    if reference is None:
        return None
    predicted = extract(reply, extract_mode)
    if predicted is None:
        return 0.0
    return 1.0 if equal(predicted, str(reference), compare) else 0.0


def parses(reference: str, compare: str = "math") -> bool:
    """Whether a reference answer can be compared at all (used to reject an answer column the verifier cannot read)."""
    _require(compare, COMPARE_MODES, "compare mode")
    if reference is None:
        return False
    if compare == "exact":
        return bool(str(reference).strip())
    form = _math_form(str(reference).strip())
    if form is None:
        return False
    if _number(form) is not None:
        return True
    return _readable(form) and _has_value(_parsed(form))


# --- extraction ---------------------------------------------------------------------------------------------


def _require(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Reject an unknown mode loudly: a typo must not silently change what the reward measures."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def _after_reasoning(reply: str) -> str:
    """The part of a reply after its reasoning: after the last `</think>`; empty if a `<think>` never closes."""
    closes = list(_THINK_CLOSE.finditer(reply))
    if closes:
        return reply[closes[-1].end():]
    return "" if _THINK_OPEN.search(reply) else reply


def _marked_answers(text: str) -> list[list[str | None]] | None:
    """Reduced contents of the tags, boxes and #### lines, in that priority order; None when nothing is marked.
    An ambiguous content is None."""
    groups = [[m.group(1) for m in _TAG.finditer(text)], _boxed_contents(text),
              [m.group(1) for m in _HASHES.finditer(text)]]
    if not any(groups):
        return None
    return [[_reduce(c) for c in group] for group in groups]


def _agreed(groups: list[list[str | None]]) -> str | None:
    """The answer of the highest-priority marked kind (its last one) if every marked answer agrees, else None."""
    answers = [a for group in groups for a in group]
    if any(a is None for a in answers) or not all(_same(answers[0], a) for a in answers[1:]):
        return None
    return next(group[-1] for group in groups if group)


def _same(a: str, b: str) -> bool:
    """Two reduced marked answers agree: equal text, or numbers of the same value (`85` and `85.0`, `\\frac12` and
    `0.5`)."""
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and _close(x, y)


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{…}` / `\\fbox{…}` (balanced braces; `\\boxed 5` too); unclosed ones are
    skipped (a truncated box states nothing)."""
    out = []
    for m in _BOXED.finditer(text):
        start = m.end()
        if start < len(text) and text[start] == "{":
            body = _balanced(text, start)
            if body is not None:
                out.append(body)
        elif m.group(0)[-1:].isspace():
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                out.append(token.group(0))
    return out


def _balanced(text: str, open_at: int) -> str | None:
    """The text inside the brace group that opens at `open_at` (escaped braces skipped); None if unclosed."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
        i += 1
    return None


def _reduce(content: str) -> str | None:
    """A marked content as an answer: unwrapped from math delimiters and boxes, cut to the right-hand side of
    working or an assignment, reduced to its number when it is one number among words. None if empty or hedged."""
    s = _undelimit(content.strip())
    boxed = _boxed_contents(s)
    if boxed:
        return _reduce(boxed[-1])
    if _has_words(s):
        s = s.rstrip(".!? ")
    s = s.rstrip(". ").strip()
    if not s or _hedges(s, symbols=False):
        return None
    s = _after_equals(s)
    number = _only_number(s)
    return number if number is not None else (s or None)


def _has_words(s: str) -> bool:
    """Whether `s` reads as prose: a run of two or more letters outside LaTeX commands (then a trailing `!` is
    punctuation, not a factorial)."""
    return any(len(w) >= 2 for w in _LETTER_RUN.findall(_LATEX_COMMAND.sub(" ", _plain(s))))


def _undelimit(s: str) -> str:
    """`s` without one pair of enclosing math delimiters ($…$, $$…$$, \\(…\\), \\[…\\])."""
    m = _DELIMITED.match(s)
    return next(g for g in m.groups() if g is not None).strip() if m else s


def _plain(s: str) -> str:
    """`s` with LaTeX text wrappers unwrapped and text escapes (\\$, \\%, thin spaces) blanked: what a reader sees."""
    return _TEXT_ESCAPE.sub(" ", _TEXT_WRAPPER.sub(r" \1 ", s))


def _after_equals(s: str) -> str:
    """The right-hand side of the last `=` when what precedes it is arithmetic or one variable (after any words):
    `47 + 38 = 85` → `85`, `The answer is x = 5` → `5`; other equations are kept whole."""
    parts = _EQUALS.split(s)
    if len(parts) < 2 or not parts[-1].strip():
        return s
    lhs = " ".join(w for w in parts[-2].split() if not _is_word(w))
    arithmetic = _ARITHMETIC.fullmatch(_ARITHMETIC_COMMAND.sub(" ", lhs))
    return parts[-1].strip() if arithmetic or _VARIABLE.fullmatch(lhs) else s


def _is_word(token: str) -> bool:
    """A token of prose: two or more letters, not a LaTeX command or a single math variable."""
    return len(token) >= 2 and token.isalpha()


def _only_number(s: str) -> str | None:
    """The number `s` states when it holds exactly one number and otherwise only prose (words, currency, %,
    punctuation), separators removed; None otherwise (`5x`, `\\sqrt{2}`, `\\frac{1}{2}` are math, not prose)."""
    plain = _plain(s)
    numbers = list(_NUMBER.finditer(plain))
    if len(numbers) != 1:
        return None
    m = numbers[0]
    rest = plain[:m.start()] + " " + plain[m.end():]
    if not _PROSE_CHARS.fullmatch(rest) or any(len(w) < 2 for w in _LETTER_RUN.findall(rest)):
        return None
    return _canonical(m.group(0))


def _canonical(number: str) -> str:
    """A number as written, without thousands separators."""
    return number.replace(",", "")


def _last_number(text: str) -> str | None:
    """The last number of the text, or None when there is none or its sentence hedges between numbers."""
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    if _hedges(_sentence_around(text, last.start(), last.end()), symbols=True):
        return None
    return _canonical(last.group(0))


def _sentence_around(text: str, start: int, end: int) -> str:
    """The sentence (or line) containing text[start:end]."""
    begin = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    after = _SENTENCE_END.search(text, end)
    return text[begin:after.start() if after else len(text)]


def _hedges(sentence: str, symbols: bool) -> bool:
    """Whether a sentence offers different numbers as the answer: `84 or 85`, `between 84 and 86`, and with
    `symbols`, its last number joined to the one before by a slash or dash (`84/85`, `84-86`) with no `=` after:
    operands of working (`170/2 = 85`) and earlier working (`90 - 5 leaves 85`) are not a hedge."""
    numbers = list(_NUMBER.finditer(sentence))
    for a, b in zip(numbers, numbers[1:]):
        gap = sentence[a.end():b.start()]
        if _value(a.group(0)) == _value(b.group(0)):
            continue
        if re.search(r"\bor\b", gap):
            return True
        if re.search(r"\band\b", gap) and re.search(r"\bbetween\b[^0-9=]*$", sentence[:a.start()]):
            return True
        if symbols and b is numbers[-1] and re.fullmatch(r"\s*[/\-–—]\s*", gap) and not _EQUALS.search(
                sentence[b.end():]):
            return True
    return False


# --- comparison ---------------------------------------------------------------------------------------------


def _exact_form(s: str) -> str:
    """The exact-comparison form: trimmed, thousands separators removed."""
    return _SEPARATED.sub(lambda m: m.group(0).replace(",", ""), s.strip())


def _value(number: str) -> Fraction | None:
    """The exact value of a number as written (separators allowed); None if it is not one or is too long."""
    try:
        return Fraction(number.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _number(s: str) -> Fraction | None:
    """The value of `s` if the whole of it is one plain number or a fraction of integers (`3/4`, `-\\frac{3}{4}`,
    `\\dfrac34`), else None. Fractions are the commonest non-integer answers; sympy takes milliseconds on them."""
    if _PLAIN_NUMBER.fullmatch(s):
        return _value(s)
    m = _FRACTION.fullmatch(s)
    if m is None:
        return None
    sign, n1, n2, d1, d2, n3, d3 = m.groups()
    numerator, denominator = _value(n1 or n2 or n3), _value(d1 or d2 or d3)
    if numerator is None or not denominator:
        return None
    return (-1 if sign else 1) * numerator / denominator


def _close(x: Fraction, reference: Fraction) -> bool:
    """Same value: integers exactly (a large count is not 'close enough'), else within 1e-9 relative."""
    if x.denominator == 1 and reference.denominator == 1:
        return x == reference
    return abs(x - reference) <= Fraction(1, 10**9) * max(1, abs(reference))


def _math_form(s: str) -> str | None:
    """An answer as math compares it: reduced like a marked answer, LaTeX thin-space thousands separators
    removed (`2\\,000` → `2000`), a Unicode minus read as `-`. None if it is empty or hedged."""
    return _reduce(_LATEX_THIN_SPACE.sub("", s).replace("\u2212", "-")) if s else None


@lru_cache(maxsize=1 << 16)
def _equal_math(predicted: str, reference: str) -> bool:
    """`equal` under "math" (cached: a group of samples often repeats an answer)."""
    p, r = _math_form(predicted), _math_form(reference)
    if p is None or r is None:
        return False
    x, y = _number(p), _number(r)
    if x is not None and y is not None:
        return _close(x, y)
    if p == r:
        return True
    if not (_readable(p) and _readable(r)):
        return False
    gold, target = _parsed(r), _parsed(p)
    return _has_value(gold) and _has_value(target) and _verify(gold, target)


def _readable(s: str) -> bool:
    """Whether math_verify can be trusted with `s`: no prose, no space-separated numbers, nothing costly."""
    return not _has_prose(s) and not _SPACED_DIGITS.search(s) and not _costly(s)


def _has_prose(s: str) -> bool:
    """Whether `s` holds a bare word (which math_verify would read as a product of one-letter symbols).
    Text in \\text{…} is explicit and allowed; so are LaTeX commands, function names and variables like `xy`."""
    bare = _LATEX_COMMAND.sub(" ", _TEXT_WRAPPER.sub(" ", s))
    for word in _LETTER_RUN.findall(bare):
        lower = word.lower()
        if lower in _MATH_WORDS:
            continue
        if len(word) >= 3 or lower in _SHORT_WORDS:
            return True
    return False


def _costly(s: str) -> bool:
    """Whether sympy could spend minutes on `s` (no timeout protects it): very long text, a power tower, an
    exponent of 1000 or more, a factorial of 1000 or more or of an expression."""
    if len(s) > _MAX_MATH_CHARS:
        return True
    s = s.replace("**", "^")
    for i, ch in enumerate(s):
        if ch == "^" and re.search(r"\^|!|[0-9]{4}", _exponent(s, i + 1)):
            return True
    return bool(re.search(r"(?:[0-9]{4,}|[)}\]])\s*!", s))


def _exponent(s: str, at: int) -> str:
    """The exponent that starts at `at` (after a `^`): a brace group, else a number, else one character."""
    rest = s[at:].lstrip()
    if rest.startswith("{"):
        return _balanced(rest, 0) or rest
    m = re.match(r"[0-9.]+|\S", rest)
    return m.group(0) if m else ""


@lru_cache(maxsize=1 << 14)
def _parsed(s: str) -> tuple:
    """math_verify's parse of `s` as inline LaTeX (both of its extractors: LaTeX and plain expressions), timeouts
    off. Cached: the same reference is parsed once, not once per sample."""
    from math_verify import parse

    return tuple(parse(f"${s}$", parsing_timeout=None))


def _has_value(parsed: tuple) -> bool:
    """Whether a parse produced a math value (it falls back to the matched string when conversion fails)."""
    return any(not isinstance(x, str) for x in parsed)


def _verify(gold: tuple, target: tuple) -> bool:
    """math_verify's verdict, timeouts off (its signal.alarm fails outside the main thread)."""
    from math_verify import verify

    return verify(list(gold), list(target), timeout_seconds=None)
