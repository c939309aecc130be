"""The upstream MiniOneRec prompt strings, character for character (reference §4, §6.1, §8.1).

These strings are data: released checkpoints were trained on exactly these tokens, so typos
("palyed", "recetenly", "{category}s", "items items") are kept on purpose.

Every builder returns a `Prompt(header, body, target, task)`:
- `header` = H(x) = PREAMBLE + "\\n\\n### Instruction:\\n" + x + "\\n\\n" ("\\n \\n" for the
  title-history task), or "" for RL prompts, which are body only;
- `body` = P(input) = "### User Input: \\n" + input + "\\n\\n### Response:\\n";
- `target` = the answer followed by "\\n" (the tokenized target gets EOS appended, see sft.py).
Header and body are tokenized separately and concatenated, as upstream does.

Deliberate deviations from upstream (documented fixes):
- **B1 answer leak fixed.** Upstream's `SidItemFeatDataset` and `RLTitle2SidDataset` put the
  answer after "### Response:\\n" inside the prompt. Here every prompt ends exactly at
  "### Response:\\n" with nothing after it.
- SID strings are the full token sequence (upstream concatenates only the first 3 tokens in
  the item-feature tasks, which drops the 4th level of de-duplicated indices).
- description2sid skips items whose description is empty (upstream asks about `""`).

The title-history task (upstream `SFTData`) picks one of 11 instruction templates per row with
`random.randint(0, 10)` from a generator seeded once per dataset build; all 11 are below
verbatim (the game-flavoured wording comes from the D3/BIGRec code upstream reused).
"""

from __future__ import annotations

import random
from typing import NamedTuple

PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. "
)
RESPONSE_MARK = "### Response:\n"

# Task instruction lines (x in H(x)).
SID_NEXT_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
ITEM_FEAT_INSTRUCTION = "Answer the question about item identification."
FUSION_INSTRUCTION = "Can you recommend the next item for the user based on their interaction history?"
TITLE_HISTORY_SID_INSTRUCTION = (
    "Based on the user's historical interaction with item titles, predict the semantic ID of the next "
    "item they may expect."
)
# Upstream SFTData.instructs, in order; "{category}" is replaced by the category phrase.
TITLE_HISTORY_TEMPLATES = (
    "Given a list of {category} the user recetenly enjoy, please write a new {category} that the user may bought",
    "Considering the {category} that has recently captured the user's interest, kindly create a compilation of other {category} that the user might have played prior to this.",
    "Based on the user's current gaming preference, please draft a list of potential {category} they may have experienced beforehand.",
    "Reflecting on the {category} the user has taken pleasure in recently, we request that you formulate a list of {category} that may have preceded the user's current enjoyment.",
    "In light of the recent gaming enjoyment expressed by the user, please assemble a list of {category} that could potentially include past titles the user has engaged with.",
    "Taking into account the {category} that has lately provided enjoyment to the user, please put together an inventory of {category} the user might have explored previously.",
    "Given the user's newfound enjoyment of a particular {category}, would you kindly generate a roster of other {category} that might resonate with their past gaming experiences?",
    "In response to the user's recent fondness for a specific {category}, we seek your assistance in listing possible {category} the user may have delighted in earlier.",
    "With respect to the {category} currently enjoyed by the user, please compile a suggestive list of {category} they may have played in the past.",
    "Bearing in mind the {category} that the user has recently been enthralled by, please construct a catalog of other {category} that the user potentially partook in beforehand.",
    "In relation to the user's recent entertainment with a given {category}, it would be appreciated if you could curate a list of {category} that might form part of the user's previous gaming history.",
)

SFT_TASKS = ("sid_next", "sid_item_feat", "fusion_seq_rec", "title_history", "title_history_sid", "sid_next_compact",
             "sid_sequence", "sid_pairs")
RL_TASKS = ("sid_next", "title2sid", "seq_title2sid", "sid_next_compact", "sid_sequence")
EVAL_STYLES = ("eval", "sft", "compact", "sequence")  # `eval.prompt` values (eval_prompt)


class Prompt(NamedTuple):
    header: str  # "" for RL prompts
    body: str  # ends with "### Response:\n"
    target: str  # answer + "\n" (EOS is added at tokenization)
    task: str
    # False: the target is not where the text ends (a `sid_pairs` row is one step of a longer
    # sequence), so no EOS is appended and nothing after the target is learnt
    ends: bool = True

    @property
    def text(self) -> str:
        return self.header + self.body


def header(instruction: str, end: str = "\n\n") -> str:
    """H(x): the shared preamble and the task instruction line."""
    return PREAMBLE + "\n\n### Instruction:\n" + instruction + end


def body(input_text: str) -> str:
    """P(input, ""): the user input block, ending at the response marker (note "Input: " has a
    trailing space before the newline)."""
    return "### User Input: \n" + input_text + "\n\n" + RESPONSE_MARK


def join_sids(sids) -> str:
    return ", ".join(sids)


def quoted_titles(titles) -> str:
    """'"t1", "t2"' (the newer classes)."""
    return ", ".join(f'"{t}"' for t in titles)


def quoted_titles_tab(titles) -> str:
    """'"t1",\\t"t2"' (SFTData's history format)."""
    return ",\t".join(f'"{t}"' for t in titles)


# ---------------------------------------------------------------------------------------------
# SFT tasks (reference §4.2)


def sid_next_input(history_sids) -> str:
    return (
        f"The user has interacted with items {join_sids(history_sids)} in chronological order. "
        "Can you predict the next possible item that the user may expect?"
    )


def sid_next(history_sids, item_sid: str) -> Prompt:
    """SidSFTDataset: SID history -> next SID."""
    return Prompt(header(SID_NEXT_INSTRUCTION), body(sid_next_input(history_sids)), item_sid + "\n", "sid_next")


def sid_next_compact(history_sids, item_sid: str) -> Prompt:
    """Ours, not upstream (the `rec recipe small-cpu` CPU recipe): the SID history with no
    instruction text, "History: <a_1><b_2><c_3><a_4>...\n### Response:\n" -> next SID. About a
    fifth of the tokens of `sid_next` with a small BPE, so a CPU sees five times more rows."""
    return Prompt("", "History: " + "".join(history_sids) + "\n" + RESPONSE_MARK, item_sid + "\n", "sid_next_compact")


def sid_sequence(history_sids, item_sid: str) -> Prompt:
    """Ours, not upstream: the item sequence itself, "History: <a_1><b_2><c_3><a_4>..." followed
    directly by the next SID, with everything after the first history item as target. One row
    trains the next-item prediction at every position of its history (as SASRec trains), and every
    position is the same task as the last one, because nothing marks where the answer starts: the
    eval/RL prompt (`sid_sequence_prompt`) is the history alone."""
    first, rest = history_sids[0], "".join(history_sids[1:])
    return Prompt("", "History: " + first, rest + item_sid + "\n", "sid_sequence")


def sid_sequence_prompt(history_sids, item_sid: str) -> Prompt:
    """The `sid_sequence` text cut after the history: what generation continues (eval, RL)."""
    return Prompt("", "History: " + "".join(history_sids), item_sid + "\n", "sid_sequence")


def sid_pair(item_sid: str, next_sid: str) -> Prompt:
    """Ours (`sid_pairs`): one consecutive pair in the `sid_sequence` text, the first item as the
    whole history. The pair is one step of a longer sequence, not its end: no "\n", no EOS."""
    return Prompt("", "History: " + item_sid, next_sid, "sid_pairs", ends=False)


def sid_to_title(sid: str, title: str) -> Prompt:
    """SidItemFeatDataset, sid2title direction (answer leak fixed)."""
    return Prompt(
        header(ITEM_FEAT_INSTRUCTION), body(f'What is the title of item "{sid}"?'), title + "\n", "sid_item_feat"
    )


def title_to_sid(title: str, sid: str) -> Prompt:
    """SidItemFeatDataset, title2sid direction (answer leak fixed)."""
    return Prompt(header(ITEM_FEAT_INSTRUCTION), body(f"Which item has the title: {title}?"), sid + "\n", "sid_item_feat")


def fusion_seq_rec(history_sids, target_title: str) -> Prompt:
    """FusionSeqRecDataset: SID history -> title of the next item."""
    text = (
        f"The user has sequentially interacted with items {join_sids(history_sids)}. "
        "Can you recommend the next item for him? Tell me the title of the item"
    )
    return Prompt(header(FUSION_INSTRUCTION), body(text), target_title + "\n", "fusion_seq_rec")


def title_history(history_titles, item_title: str, category: str, template_index: int) -> Prompt:
    """SFTData: title history -> quoted next title. Its header ends with "\\n \\n"."""
    instruction = TITLE_HISTORY_TEMPLATES[template_index].format(category=category)
    text = f"The user has palyed the following {category}s before: {quoted_titles_tab(history_titles)}"
    return Prompt(header(instruction, end="\n \n"), body(text), f'"{item_title}"\n', "title_history")


def pick_title_history_templates(n_rows: int, seed: int) -> list[int]:
    """Template index per row: upstream seeds Python's `random` once and calls
    `random.randint(0, 10)` for each row in order; a private generator gives the same sequence."""
    rng = random.Random(seed)
    return [rng.randint(0, len(TITLE_HISTORY_TEMPLATES) - 1) for _ in range(n_rows)]


def title_history_sid(history_titles, item_sid: str, category: str) -> Prompt:
    """TitleHistory2SidSFTDataset: title history -> next SID ("{category} items" reads
    "items items" for Industrial, as upstream)."""
    text = (
        f"The user has interacted with the following {category} items in chronological order: "
        f"{quoted_titles(history_titles)}. Can you predict the next item the user may expect?"
    )
    return Prompt(header(TITLE_HISTORY_SID_INSTRUCTION), body(text), item_sid + "\n", "title_history_sid")


# ---------------------------------------------------------------------------------------------
# Evaluation (reference §8.1)


def eval_input(history_sids) -> str:
    return (
        "Can you predict the next possible item the user may expect, given the following chronological "
        f"interaction history: {join_sids(history_sids)}"
    )


def eval_prompt(history_sids, item_sid: str, style: str = "eval") -> Prompt:
    """EvalSidDataset (style "eval", upstream evaluate.py), the SFT next-SID wording ("sft"), the
    compact next-SID wording ("compact") or the bare item sequence ("sequence")."""
    if style == "sft":
        return sid_next(history_sids, item_sid)._replace(task="eval")
    if style == "compact":
        return sid_next_compact(history_sids, item_sid)._replace(task="eval")
    if style == "sequence":
        return sid_sequence_prompt(history_sids, item_sid)._replace(task="eval")
    if style != "eval":
        raise ValueError(f"unknown eval prompt style {style!r}")
    return Prompt(header(SID_NEXT_INSTRUCTION), body(eval_input(history_sids)), item_sid + "\n", "eval")


# ---------------------------------------------------------------------------------------------
# RL prompt sets (reference §6.1): body only, no header.


def rl_sid_next(history_sids, item_sid: str) -> Prompt:
    """SidDataset."""
    return Prompt("", body(sid_next_input(history_sids)), item_sid + "\n", "sid_next")


def rl_title_to_sid(title: str, sid: str) -> Prompt:
    """RLTitle2SidDataset, title2sid (answer leak fixed)."""
    return Prompt("", body(f"Which item has the title: {title}?"), sid + "\n", "title2sid")


def rl_description_to_sid(description: str, sid: str) -> Prompt:
    """RLTitle2SidDataset, description2sid (answer leak fixed)."""
    text = f'An item can be described as follows: "{description}". Which item is it describing?'
    return Prompt("", body(text), sid + "\n", "description2sid")


def rl_seq_title_to_sid(history_titles, item_sid: str) -> Prompt:
    """RLSeqTitle2SidDataset."""
    text = (
        f"Given the title sequence of user historical interactive items: {quoted_titles(history_titles)}, "
        "can you recommend a suitable next item for the user?"
    )
    return Prompt("", body(text), item_sid + "\n", "seq_title2sid")


def template_texts(category: str) -> list[str]:
    """Every fixed piece of prompt text (for training a tokenizer that knows the templates)."""
    texts = [header(x) for x in (SID_NEXT_INSTRUCTION, ITEM_FEAT_INSTRUCTION, FUSION_INSTRUCTION, TITLE_HISTORY_SID_INSTRUCTION)]
    texts += [header(t.format(category=category), end="\n \n") for t in TITLE_HISTORY_TEMPLATES]
    texts += [
        body(sid_next_input([])),
        body(eval_input([])),
        fusion_seq_rec([], "").body,
        title_history([], "", category, 0).body,
        title_history_sid([], "", category).body,
        rl_description_to_sid("", "").body,
        rl_seq_title_to_sid([], "").body,
        body("Which item has the title: ?"),
        body('What is the title of item ""?'),
    ]
    return texts
