"""GSM8K problems for `rec grpo`: reading the jsonl files, generated arithmetic problems, prompts,
and the robust number parsing shared by the reward functions.

Data: one JSON object per line with `question` and `answer`; the gold answer is the text after the
last `####` of `answer` (GSM8K's convention, e.g. "... so she has 18 dollars.\n#### 18").

Answer format asked of the model (and checked by the format reward, `rec.train.rewards`): work
the problem out, then end the completion with one line `#### <number>`. The prompt says so in
plain words; with a chat template it is the system message, otherwise a short preamble before
"Question: ...\nAnswer:".

Number parsing (`parse_number`, `extract_final_number`) accepts what models write: thousands
separators ("1,234"), signs ("-5", "+5", the Unicode minus), decimals ("3.50", ".5"), currency
("$12", "-$3"), percent signs and trailing units or words ("12 dollars", "5km", "42.").
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from rec.errors import RecError

ANSWER_MARK = "####"

# A number as written in prose: optional sign and "$", digits with optional thousands groups,
# optional decimals, optional fraction. The look-behind keeps digits inside words ("x2", "v1.5")
# and the right side of "3-5" from reading as signed numbers of their own.
_NUMBER_RE = re.compile(
    r"(?<![\w.$])"
    r"(?P<sign>[-+\u2212])?\$?\s?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)?"
    r"(?P<frac>\.\d+)?"
    r"(?:/(?P<den>\d+))?"
)

FORMAT_INSTRUCTION = (
    "Solve the math problem step by step. At the end, write the final answer as a number "
    'on its own line in the form "#### <number>".'
)


def _match_value(match: re.Match) -> float | None:
    int_part, frac = match.group("int"), match.group("frac")
    if int_part is None and frac is None:
        return None
    value = float((int_part or "0").replace(",", "") + (frac or ""))
    den = match.group("den")
    if den is not None:
        if int(den) == 0 or frac is not None:
            return None
        value = value / int(den)
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    return value


def find_numbers(text: str) -> list[float]:
    """Every number in `text`, in order (see the module docstring for what counts)."""
    values = []
    for match in _NUMBER_RE.finditer(text):
        value = _match_value(match)
        if value is not None:
            values.append(value)
    return values


def parse_number(text: str) -> float | None:
    """The first number in `text` (e.g. "$1,234.50 dollars" -> 1234.5), or None."""
    found = find_numbers(text)
    return found[0] if found else None


def extract_final_number(completion: str) -> float | None:
    """The model's final answer: the first number after the last "####" when there is one,
    otherwise the last number anywhere in the completion; None when there is no number."""
    if ANSWER_MARK in completion:
        tail = completion.rsplit(ANSWER_MARK, 1)[1]
        value = parse_number(tail)
        if value is not None:
            return value
    found = find_numbers(completion)
    return found[-1] if found else None


def numbers_equal(a: float, b: float) -> bool:
    """Equality up to float noise (answers like 0.1+0.2 must equal 0.3)."""
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the full GSM8K answer text (reasoning + "#### N")
    answer: float  # the gold final number


def gold_answer(answer_text: str, where: str) -> float:
    """The number after the last "####" of a GSM8K answer; RecError naming `where` otherwise."""
    if ANSWER_MARK not in answer_text:
        raise RecError(f"{where}: 'answer' has no '{ANSWER_MARK} <number>' line")
    value = parse_number(answer_text.rsplit(ANSWER_MARK, 1)[1])
    if value is None:
        raise RecError(f"{where}: no number after '{ANSWER_MARK}' in 'answer'")
    return value


def parse_jsonl(text: str, source: str, limit: int = -1) -> list[Problem]:
    """Problems from jsonl text; `source` names the file in errors (file:line: message)."""
    problems: list[Problem] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise RecError(f"{where}: expected a JSON object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise RecError(f"{where}: missing or empty '{key}'")
        problems.append(Problem(obj["question"].strip(), obj["answer"], gold_answer(obj["answer"], where)))
        if 0 <= limit <= len(problems):
            break
    return problems


def read_gsm8k(data_dir: str, split: str, limit: int = -1) -> list[Problem]:
    """`<data_dir>/<split>.jsonl` (local or gs://), the first `limit` problems (-1 = all)."""
    from rec import storage

    path = f"{data_dir.rstrip('/')}/{split}.jsonl"
    if not data_dir:
        raise RecError("config: 'data.dir' is empty; set it to a GSM8K directory or use grpo.synthetic=N")
    if not storage.exists(path):
        raise RecError(f"{path}: GSM8K split '{split}' not found (expected {split}.jsonl in data.dir)")
    problems = parse_jsonl(storage.read_text(path), path, limit)
    if not problems:
        raise RecError(f"{path}: no problems in the file")
    return problems


def synthetic_problems(count: int, seed: int) -> list[Problem]:
    """`count` small arithmetic word problems with GSM8K-style solutions (demo and CI).

    Deterministic in (count, seed); answers are integers so the correctness reward is exact."""
    rng = random.Random(seed)
    names = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay"]
    things = ["apples", "books", "coins", "pens", "stamps", "shells"]
    problems = []
    for _ in range(count):
        name, thing = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            question = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?"
            answer, work = a + b, f"{a} + {b} = {a + b}"
        elif kind == 1:
            a = a + b
            question = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
            answer, work = a - b, f"{a} - {b} = {a - b}"
        else:
            question = f"{name} buys {b} bags with {a} {thing} in each bag. How many {thing} is that in total?"
            answer, work = a * b, f"{b} * {a} = {a * b}"
        problems.append(Problem(question, f"{work}\n{ANSWER_MARK} {answer}", float(answer)))
    return problems


def format_prompt(tokenizer, question: str) -> str:
    """The prompt text for one question: the tokenizer's chat template when it has one (system
    message = the format instruction), else a plain "Question: ...\\nAnswer:" prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": FORMAT_INSTRUCTION},
            {"role": "user", "content": question},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{FORMAT_INSTRUCTION}\n\nQuestion: {question}\nAnswer:"
