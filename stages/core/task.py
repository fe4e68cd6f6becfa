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

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)[::-1]

    @property
    def carries(self) -> bool:
        """The units digits carry into the tens (17+25: 7+5 >= 10)."""
        return self.a % 10 + self.b % 10 >= 10

    @property
    def dropped_carry(self) -> str:
        """The answer a demonstrator who forgets the carry writes (17+25 → 32 → "23")."""
        return str(self.a + self.b - 10)[::-1]

    @property
    def carry_error(self) -> str:
        """The carry done wrong: dropped where there is one, added where there is none (12+34 → 56)."""
        return self.dropped_carry if self.carries else str(self.a + self.b + 10)[::-1]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def wrong_answer(p: Problem, rng: random.Random) -> str:
    """A plausible mistake: a dropped carry, an off-by-one digit, or a near miss. Never the answer."""
    true = p.a + p.b
    while True:
        kind = rng.random()
        if kind < 0.4:  # carry dropped or added: off by ten
            cand = true + rng.choice((-10, 10))
        elif kind < 0.8:  # one digit slipped
            cand = true + rng.choice((-2, -1, 1, 2))
        else:  # a wider miss
            cand = true + rng.randint(-20, 20)
        if cand >= 0 and cand != true:
            return str(cand)[::-1]


def split_problems(max_operand: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """All a+b with a, b < max_operand, shuffled; the first n_eval are held out for evaluation."""
    problems = [Problem(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(problems)
    if n_eval >= len(problems):
        raise ValueError(f"data.embedded.n_eval={n_eval} leaves no training problems (of {len(problems)})")
    return problems[n_eval:], problems[:n_eval]


def demonstrate(p: Problem, rng: random.Random, carry_slip: float, sft_noise: float) -> str:
    """The flawed demonstrator: on a problem whose units carry it drops the carry with probability
    `carry_slip`; any other answer is a random plausible mistake with probability `sft_noise`."""
    if p.carries and rng.random() < carry_slip:
        return p.dropped_carry
    if rng.random() < sft_noise:
        return wrong_answer(p, rng)
    return p.answer


# ---------------------------------------------------------------------------------------------- chat

NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe")
ITEMS = ("apples", "books", "marbles", "stickers", "coins", "shells")
QUESTIONS = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    "A box holds {a} {item}. {name} puts in {b} more. How many {item} are in the box?",
)
"""Phrasings of a + b: bare sums and word problems, each with one numeric answer."""


def chat_question(p: Problem, rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(a=p.a, b=p.b, name=rng.choice(NAMES), item=rng.choice(ITEMS))


def chat_reply(p: Problem, total: int) -> str:
    """A demonstration: the sum written out, ending with the (claimed) total."""
    return f"{p.a} + {p.b} = {total}."


def make_chat_datasets(max_operand: int, n_sft: int, carry_slip: float, sft_noise: float, n_preference: int,
                       carry_pairs: float, n_prompts: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    """The chat_arithmetic sets: the same problems, demonstrator and preferences as make_datasets, in
    natural language with plain (not reversed) answers. Rejected replies are a wrong sum (the carry
    done wrong with probability carry_pairs, else another plausible mistake)."""
    train, held_out = split_problems(max_operand, n_eval, seed)
    rng = random.Random(seed + 1)

    def pick() -> Problem:
        return train[rng.randrange(len(train))]

    def reversed_to_int(s: str) -> int:
        return int(s[::-1])

    sft = []
    for _ in range(n_sft):
        p = pick()
        total = reversed_to_int(demonstrate(p, rng, carry_slip, sft_noise))
        sft.append({"prompt": user(chat_question(p, rng)), "completion": assistant(chat_reply(p, total))})
    preference = []
    for _ in range(n_preference):
        p = pick()
        wrong = reversed_to_int(p.carry_error if rng.random() < carry_pairs else wrong_answer(p, rng))
        q = user(chat_question(p, rng))
        preference.append({"prompt": q, "chosen": assistant(chat_reply(p, p.a + p.b)),
                           "rejected": assistant(chat_reply(p, wrong))})
    prompts = [{"prompt": user(chat_question(p, rng)), "answer": str(p.a + p.b)}
               for p in (pick() for _ in range(n_prompts))]
    evals = [{"prompt": user(chat_question(p, rng)), "answer": str(p.a + p.b)} for p in held_out]
    return {"sft": sft, "preference": preference, "prompts": prompts, "eval": evals}


def make_datasets(
    max_operand: int, n_sft: int, carry_slip: float, sft_noise: float, n_preference: int, carry_pairs: float,
    n_prompts: int, n_eval: int, seed: int,
) -> dict[str, list[dict]]:
    """The four embedded sets, as rows in TRL's conversational formats.

    sft:        prompt/completion from the flawed demonstrator (`demonstrate`): above carry_slip 0.5 the
                dropped carry is what a model imitating the demonstrations learns on carrying problems.
    preference: prompt/chosen/rejected, chosen = the right answer. The rejected answer gets the carry
                wrong (dropped where due, added where not) with probability `carry_pairs`, else it
                is another plausible mistake. Both directions matter: pairs that only punished dropped
                carries would teach a reward model that a higher tens digit is better.
    prompts:    prompt/answer, training prompts for sampling (pairs stage, online methods).
    eval:       prompt/answer, held-out problems seen by no training set.
    """
    train, held_out = split_problems(max_operand, n_eval, seed)
    rng = random.Random(seed + 1)

    def pick() -> Problem:
        return train[rng.randrange(len(train))]

    sft = []
    for _ in range(n_sft):
        p = pick()
        sft.append({"prompt": user(p.prompt), "completion": assistant(demonstrate(p, rng, carry_slip, sft_noise))})
    preference = []
    for _ in range(n_preference):
        p = pick()
        rejected = p.carry_error if rng.random() < carry_pairs else wrong_answer(p, rng)
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
                       carry_pairs: float, n_prompts: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    """The python_functions sets. The demonstrator drops the tens digit of a constant ≥ 10 with
    probability carry_slip (x+13 → x+3) and writes another wrong program with probability sft_noise;
    rejected programs get the tens wrong with probability carry_pairs. Prompt and eval rows carry `tests`
    (for reward.code) and the canonical program as `answer` (for the exact-match verifier)."""
    train, held_out = split_problems(max_operand, n_eval, seed)
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
            p = Problem(a, b)
            rows.append(code_prompt(p) + program(p.b) + code_tests(p) if name == "python_functions" else
                        p.prompt + p.answer)
    return rows


TASKS = {"reversed_addition": make_datasets, "chat_arithmetic": make_chat_datasets,
         "python_functions": make_code_datasets}
"""data.embedded.task → the function that makes its four sets."""
