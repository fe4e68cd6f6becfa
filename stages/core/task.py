"""The embedded synthetic tasks, generated from a seed.

reversed_addition: `12+34=` → `64` (46 written least-significant digit first). Writing the digits in
reverse lets a small model produce each digit after the carry that decides it, so a 1M-parameter Llama
learns the task in minutes on a CPU; the verifier is an exact string match, so the reward cannot be gamed.

chat_arithmetic: the same sums asked in natural language ("What is 47 + 38?", short word problems) and
answered in a sentence ("47 + 38 = 85."), for a pretrained chat model; the verifier extracts the answer
from the reply (verifier.extract: auto).

python_functions: `f(x) = x + 13` → `def f(x): return x+13`, a program, checked by running it against the
row's `tests` (`assert f(4) == 17`) in the sandbox (reward.code); the exact-match verifier compares
it with the canonical program. It exercises the code-execution reward end to end on the tiny model.

Everything is generated from a seed; the held-out (eval) problems never appear in any training set.
Rows follow TRL's conversational column conventions so the same loaders serve hub datasets.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


def column_add(a: int, b: int, drop) -> int:
    """a + b worked column by column from the units, as the demonstrator does: `drop(column)` is asked at
    each column that carries (and only there) whether that carry is forgotten."""
    carry, total, place = 0, 0, 1
    for col in range(len(str(max(a, b)))):
        s = a // 10**col % 10 + b // 10**col % 10 + carry
        carry = 0 if s >= 10 and drop(col) else s // 10
        total, place = total + s % 10 * place, place * 10
    return total + carry * place


def written(partials: list[int]) -> str:
    """The reversed-digit answer: each running sum least-significant digit first, space-separated."""
    return " ".join(str(x)[::-1] for x in partials)


@dataclass(frozen=True)
class Problem:
    ops: tuple[int, ...]
    """The operands (`data.embedded.terms` of them). The answer is the chain of running sums: 12+34+45=
    is answered "64 19" (46, then 46 + 45 = 91), each step a two-number sum that reads the one before."""

    @property
    def a(self) -> int:
        return self.ops[0]

    @property
    def b(self) -> int:
        return self.ops[1]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.ops)) + "="

    @property
    def total(self) -> int:
        return sum(self.ops)

    def chain(self, drop=lambda step, col: False) -> list[int]:
        """The running sums as worked by someone who forgets the carries `drop(step, column)` says; a wrong
        running sum is carried into every later step."""
        out, run = [], self.ops[0]
        for i, o in enumerate(self.ops[1:]):
            run = column_add(run, o, lambda col: drop(i, col))
            out.append(run)
        return out

    @property
    def answer(self) -> str:
        return written(self.chain())

    @property
    def carries(self) -> list[tuple[int, int]]:
        """(step, column) of every carry in the right chain (17+25: [(0, 0)], the units)."""
        out = []
        self.chain(lambda step, col: out.append((step, col)))  # append returns None: nothing is dropped
        return out

    def carry_error(self, rng: random.Random) -> list[int]:
        """The chain with one carry done wrong: dropped (at a random one where there are several), or,
        where nothing carries, one added into the tens of the last sum (12+34 → 56)."""
        cs = self.carries
        if not cs:
            right = self.chain()
            return right[:-1] + [right[-1] + 10]
        pick = cs[0] if len(cs) == 1 else rng.choice(cs)
        return self.chain(lambda step, col: (step, col) == pick)


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def wrong_answer(p: Problem, rng: random.Random) -> list[int]:
    """The chain with its last sum mistaken: a dropped carry, an off-by-one digit, or a near miss. Never
    the answer."""
    right = p.chain()
    true = right[-1]
    while True:
        kind = rng.random()
        if kind < 0.4:  # carry dropped or added: off by ten
            cand = true + rng.choice((-10, 10))
        elif kind < 0.8:  # one digit slipped
            cand = true + rng.choice((-2, -1, 1, 2))
        else:  # a wider miss
            cand = true + rng.randint(-20, 20)
        if cand >= 0 and cand != true:
            return right[:-1] + [cand]


ENUMERATE = 250_000
"""Up to this many distinct problems are all enumerated and shuffled; above it (four terms of 50 and
more), the held-out set and a training pool of POOL problems are drawn without replacement."""
POOL = 200_000


def split_problems(max_operand: int, n_eval: int, seed: int, terms: int = 2) -> tuple[list[Problem], list[Problem]]:
    """Distinct sums of `terms` operands in [0, max_operand), shuffled; the first n_eval are held out."""
    total = max_operand**terms
    rng = random.Random(seed)
    if total <= ENUMERATE:
        problems = [Problem(ops) for ops in itertools.product(range(max_operand), repeat=terms)]
        rng.shuffle(problems)
    else:
        problems = [Problem(tuple(i // max_operand**k % max_operand for k in reversed(range(terms))))
                    for i in rng.sample(range(total), n_eval + POOL)]
    if n_eval >= len(problems):
        raise ValueError(f"data.embedded.n_eval={n_eval} leaves no training problems (of {len(problems)})")
    return problems[n_eval:], problems[:n_eval]


def demonstrate(p: Problem, rng: random.Random, carry_slip: float, sft_noise: float) -> list[int]:
    """The flawed demonstrator's running sums: it forgets each carry with probability `carry_slip`,
    independently per carrying column of every step, and carries a wrong sum on, so a longer chain (more
    terms) is right less often: every step must be right. A chain with no carry forgotten has its last sum
    replaced by a random plausible mistake with probability `sft_noise`."""
    claimed = p.chain(lambda step, col: rng.random() < carry_slip)
    if claimed != p.chain():
        return claimed
    if rng.random() < sft_noise:
        return wrong_answer(p, rng)
    return claimed


# ---------------------------------------------------------------------------------------------- chat

NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe")
ITEMS = ("apples", "books", "marbles", "stickers", "coins", "shells")
QUESTIONS = (
    "What is {sum}?",
    "What is {plus}?",
    "Add {list}.",
    "Compute {sum}.",
    "{name} has {a} {item} and gets {more}. How many {item} does {name} have now?",
    "A box holds {a} {item}. {name} puts in {more}. How many {item} are in the box?",
)
"""Phrasings of a sum: bare sums and word problems, each with one numeric answer (two terms: "What is
47 + 38?", "Add 47 and 38."; three: "Add 47, 38 and 5.", "… gets 38 more, then 5 more.")."""


def chat_question(p: Problem, rng: random.Random) -> str:
    ops = [str(o) for o in p.ops]
    return rng.choice(QUESTIONS).format(
        sum=" + ".join(ops), plus=" plus ".join(ops), list=", ".join(ops[:-1]) + " and " + ops[-1], a=ops[0],
        more=", then ".join(f"{o} more" for o in ops[1:]), name=rng.choice(NAMES), item=rng.choice(ITEMS))


def chat_reply(p: Problem, partials: list[int]) -> str:
    """A demonstration: each step written out with its (claimed) running sum, the last being the total
    ("47 + 38 = 85." for two terms; "47 + 38 = 85, 85 + 5 = 90." for three)."""
    left = [p.ops[0], *partials[:-1]]
    return ", ".join(f"{a} + {b} = {s}" for a, b, s in zip(left, p.ops[1:], partials)) + "."


def make_chat_datasets(max_operand: int, n_sft: int, carry_slip: float, sft_noise: float, n_preference: int,
                       carry_pairs: float, n_prompts: int, n_eval: int, seed: int,
                       terms: int = 2) -> dict[str, list[dict]]:
    """The chat_arithmetic sets: the same problems, demonstrator and preferences as make_datasets, in
    natural language with plain (not reversed) answers. Rejected replies are a wrong sum (the carry
    done wrong with probability carry_pairs, else another plausible mistake)."""
    train, held_out = split_problems(max_operand, n_eval, seed, terms)
    rng = random.Random(seed + 1)

    def pick() -> Problem:
        return train[rng.randrange(len(train))]

    sft = []
    for _ in range(n_sft):
        p = pick()
        claimed = demonstrate(p, rng, carry_slip, sft_noise)
        sft.append({"prompt": user(chat_question(p, rng)), "completion": assistant(chat_reply(p, claimed))})
    preference = []
    for _ in range(n_preference):
        p = pick()
        wrong = p.carry_error(rng) if rng.random() < carry_pairs else wrong_answer(p, rng)
        q = user(chat_question(p, rng))
        preference.append({"prompt": q, "chosen": assistant(chat_reply(p, p.chain())),
                           "rejected": assistant(chat_reply(p, wrong))})
    prompts = [{"prompt": user(chat_question(p, rng)), "answer": str(p.total)}
               for p in (pick() for _ in range(n_prompts))]
    evals = [{"prompt": user(chat_question(p, rng)), "answer": str(p.total)} for p in held_out]
    return {"sft": sft, "preference": preference, "prompts": prompts, "eval": evals}


def make_datasets(
    max_operand: int, n_sft: int, carry_slip: float, sft_noise: float, n_preference: int, carry_pairs: float,
    n_prompts: int, n_eval: int, seed: int, terms: int = 2,
) -> dict[str, list[dict]]:
    """The four embedded sets, as rows in TRL's conversational formats; `terms` operands per sum.

    sft:        prompt/completion from the flawed demonstrator (`demonstrate`): above carry_slip 0.5 the
                dropped carry is what a model imitating the demonstrations learns on carrying problems.
    preference: prompt/chosen/rejected, chosen = the right answer. The rejected answer gets the carry
                wrong (dropped where due, added where not) with probability `carry_pairs`, else it
                is another plausible mistake. Both directions matter: pairs that only punished dropped
                carries would teach a reward model that a higher tens digit is better.
    prompts:    prompt/answer, training prompts for sampling (pairs stage, online methods).
    eval:       prompt/answer, held-out problems seen by no training set.
    """
    train, held_out = split_problems(max_operand, n_eval, seed, terms)
    rng = random.Random(seed + 1)

    def pick() -> Problem:
        return train[rng.randrange(len(train))]

    sft = []
    for _ in range(n_sft):
        p = pick()
        claimed = demonstrate(p, rng, carry_slip, sft_noise)
        sft.append({"prompt": user(p.prompt), "completion": assistant(written(claimed))})
    preference = []
    for _ in range(n_preference):
        p = pick()
        rejected = written(p.carry_error(rng) if rng.random() < carry_pairs else wrong_answer(p, rng))
        preference.append({"prompt": user(p.prompt), "chosen": assistant(p.answer), "rejected": assistant(rejected)})
    prompts = [{"prompt": user(p.prompt), "answer": p.answer} for p in (pick() for _ in range(n_prompts))]
    evals = [{"prompt": user(p.prompt), "answer": p.answer} for p in held_out]
    return {"sft": sft, "preference": preference, "prompts": prompts, "eval": evals}


# ---------------------------------------------------------------------------------------------- code

def program(b: int) -> str:
    return f"def f(x): return x+{b}"


def code_prompt(p: Problem) -> str:
    return f"f(x) = x + {p.b}"


def code_tests(p: Problem) -> str:
    return f"assert f({p.a}) == {p.a + p.b}\nassert f(0) == {p.b}\n"


def wrong_program(p: Problem, rng: random.Random) -> str:
    """A plausible wrong program: another constant, a subtraction, or a constant function."""
    kind = rng.randrange(3)
    if kind == 0:
        return program(p.b + rng.choice((-1, 1, 10)) if p.b else p.b + 1)
    return f"def f(x): return x-{p.b}" if kind == 1 and p.b else f"def f(x): return {p.b}"


def make_code_datasets(max_operand: int, n_sft: int, carry_slip: float, sft_noise: float, n_preference: int,
                       carry_pairs: float, n_prompts: int, n_eval: int, seed: int,
                       terms: int = 2) -> dict[str, list[dict]]:
    """The python_functions sets. The demonstrator drops the tens digit of a constant ≥ 10 with
    probability carry_slip (x+13 → x+3) and writes another wrong program with probability sft_noise;
    rejected programs get the tens wrong with probability carry_pairs. Prompt and eval rows carry `tests`
    (for reward.code) and the canonical program as `answer` (for the exact-match verifier). Two terms
    only (config refuses others)."""
    train, held_out = split_problems(max_operand, n_eval, seed, terms)
    rng = random.Random(seed + 1)

    def pick() -> Problem:
        return train[rng.randrange(len(train))]

    def demonstrated(p: Problem) -> str:
        if p.b >= 10 and rng.random() < carry_slip:
            return program(p.b % 10)
        return wrong_program(p, rng) if rng.random() < sft_noise else program(p.b)

    sft = []
    for _ in range(n_sft):
        p = pick()
        sft.append({"prompt": user(code_prompt(p)), "completion": assistant(demonstrated(p))})
    preference = []
    for _ in range(n_preference):
        p = pick()
        rejected = program(p.b % 10 if p.b >= 10 else p.b + 10) if rng.random() < carry_pairs else wrong_program(p, rng)
        preference.append({"prompt": user(code_prompt(p)), "chosen": assistant(program(p.b)),
                           "rejected": assistant(rejected)})

    def with_tests(p: Problem) -> dict:
        return {"prompt": user(code_prompt(p)), "tests": code_tests(p), "answer": program(p.b)}

    return {"sft": sft, "preference": preference, "prompts": [with_tests(pick()) for _ in range(n_prompts)],
            "eval": [with_tests(p) for p in held_out]}


def corpus(max_operand: int, name: str = "reversed_addition") -> list[str]:
    """Text the embedded tokenizer is trained on: every prompt and answer of the task."""
    rows = []
    for a in range(max_operand):
        for b in range(max_operand):
            p = Problem((a, b))
            rows.append(code_prompt(p) + program(p.b) + code_tests(p) if name == "python_functions" else
                        p.prompt + p.answer)
    return rows


TASKS = {"reversed_addition": make_datasets, "chat_arithmetic": make_chat_datasets,
         "python_functions": make_code_datasets}
"""data.embedded.task → the function that makes its four sets."""
