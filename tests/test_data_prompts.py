"""Prompt strings against hand-written expectations (reference §4.1, §4.2, §6.1, §8.1).

The expected strings are typed out here from the reference text, not produced by the code under
test; the row is line 3 of the shared Industrial valid.csv (user A5382)."""

import random

import pytest

from rec.data import prompts as P
from rec.data.dataset import category_phrase, load_catalogue, read_split
from rec.data.rl import rl_prompts
from rec.data.sft import sft_prompts

PRE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n"
)
HIST_SIDS = "<a_224><b_38><c_1>, <a_244><b_35><c_73>, <a_244><b_35><c_73>, <a_42><b_133><c_2>"
T1 = "StainlessTown K18FNW Stainless Steel Fender Washer Assortment Kit"
T2 = "Dap 08648 10.1 oz. 100% Silicone Kitchen and Bath Sealant, Clear"
T4 = "PORTER-CABLE PBN18125 18 Gauge 1-1/4-Inch Brad Nail (5000-Pack)"
TARGET_TITLE = "Loctite Heavy Duty Epoxy Quick Set 8-Fluid Ounce Bottle (1365736)"
TARGET_SID = "<a_165><b_35><c_57>"


@pytest.fixture
def industrial(industrial_dir):
    rows = read_split(industrial_dir, "valid", limit=3)
    return load_catalogue(industrial_dir), rows[1], category_phrase(industrial_dir)


def by_task(prompt_list, task):
    return [p for p in prompt_list if p.task == task]


def test_row_parsed_as_in_the_csv(industrial):
    _, row, category = industrial
    assert category == "industrial and scientific items"
    assert row.user_id == "A5382"
    assert row.history_titles == (T1, T2, T2, T4)
    assert row.history_ids == (3437, 642, 642, 2520)
    assert row.item_id == 1128 and row.item_sid == TARGET_SID and row.item_title == TARGET_TITLE


def test_sid_next(industrial):
    cat, row, category = industrial
    (p,) = sft_prompts(cat, [row], ["sid_next"], category, seed=0)
    assert p.header == PRE + "Can you predict the next possible item that the user may expect?\n\n"
    assert p.body == (
        "### User Input: \nThe user has interacted with items " + HIST_SIDS + " in chronological order. "
        "Can you predict the next possible item that the user may expect?\n\n### Response:\n"
    )
    assert p.target == TARGET_SID + "\n"


def test_fusion_seq_rec(industrial):
    cat, row, category = industrial
    (p,) = sft_prompts(cat, [row], ["fusion_seq_rec"], category, seed=0)
    assert p.header == PRE + "Can you recommend the next item for the user based on their interaction history?\n\n"
    assert p.body == (
        "### User Input: \nThe user has sequentially interacted with items " + HIST_SIDS + ". Can you recommend "
        "the next item for him? Tell me the title of the item\n\n### Response:\n"
    )
    assert p.target == TARGET_TITLE + "\n"


def test_title_history_keeps_upstream_typos_and_tab_format(industrial):
    cat, row, category = industrial
    (p,) = sft_prompts(cat, [row], ["title_history"], category, seed=0)
    k = random.Random(0).randint(0, 10)  # upstream: random.seed(seed); random.randint(0, 10) per row
    instruction = P.TITLE_HISTORY_TEMPLATES[k].format(category=category)
    assert p.header == PRE + instruction + "\n \n"
    assert p.body == (
        "### User Input: \nThe user has palyed the following industrial and scientific itemss before: "
        f'"{T1}",\t"{T2}",\t"{T2}",\t"{T4}"\n\n### Response:\n'
    )
    assert p.target == f'"{TARGET_TITLE}"\n'


def test_title_history_templates_verbatim():
    assert len(P.TITLE_HISTORY_TEMPLATES) == 11
    first = P.TITLE_HISTORY_TEMPLATES[0].format(category="office products")
    assert first == "Given a list of office products the user recetenly enjoy, please write a new office products that the user may bought"
    assert P.TITLE_HISTORY_TEMPLATES[8].format(category="books") == (
        "With respect to the books currently enjoyed by the user, please compile a suggestive list of books they may have played in the past."
    )


def test_title_history_template_choice_is_seeded_per_row():
    picks = P.pick_title_history_templates(50, seed=7)
    rng = random.Random(7)
    assert picks == [rng.randint(0, 10) for _ in range(50)]
    assert len(set(picks)) > 3 and P.pick_title_history_templates(50, seed=7) == picks


def test_title_history_sid_reads_items_items(industrial):
    cat, row, category = industrial
    (p,) = sft_prompts(cat, [row], ["title_history_sid"], category, seed=0)
    assert p.header == PRE + (
        "Based on the user's historical interaction with item titles, predict the semantic ID of the next item they may expect.\n\n"
    )
    assert p.body == (
        "### User Input: \nThe user has interacted with the following industrial and scientific items items in "
        f'chronological order: "{T1}", "{T2}", "{T2}", "{T4}". Can you predict the next item the user may expect?'
        "\n\n### Response:\n"
    )
    assert p.target == TARGET_SID + "\n"


def test_sid_item_feat_answer_leak_fixed(industrial):
    cat, _, category = industrial
    feat = sft_prompts(cat, [], ["sid_item_feat"], category, seed=0)
    # one per distinct SID, then one per distinct title (reference §4.2: 3,670 + 3,646)
    assert len(feat) == 3670 + 3646
    sid2title, title2sid = feat[0], feat[3670]
    header = PRE + "Answer the question about item identification.\n\n"
    assert sid2title.header == header and title2sid.header == header
    title0 = "SUPCO SPP6 Relay/Capacitor Hard Start Kit with 500% Increase Starting Torque"
    assert sid2title.body == '### User Input: \nWhat is the title of item "<a_236><b_231><c_226>"?\n\n### Response:\n'
    assert sid2title.target == title0 + "\n"
    assert title2sid.body == f"### User Input: \nWhich item has the title: {title0}?\n\n### Response:\n"
    assert title2sid.target == "<a_236><b_231><c_226>\n"
    assert all(p.body.endswith("### Response:\n") for p in feat)  # B1: nothing after the marker


def test_sft_mixture_size(industrial_dir):
    # reference §4.2: 4 row-based tasks + 7,316 item-feature samples (Industrial)
    cat, rows = load_catalogue(industrial_dir), read_split(industrial_dir, "valid", limit=500)
    from rec.config import DataConfig

    upstream_tasks = DataConfig().tasks  # the five upstream tasks (SFT_TASKS also has our extras)
    mixture = sft_prompts(cat, rows, upstream_tasks, category_phrase(industrial_dir), seed=42)
    assert len(mixture) == 4 * 500 + 7316
    assert all(p.body.endswith("### Response:\n") and p.target.endswith("\n") for p in mixture)


def test_eval_prompt(industrial):
    _, row, _ = industrial
    p = P.eval_prompt(row.history_sids, row.item_sid)
    assert p.header == PRE + "Can you predict the next possible item that the user may expect?\n\n"
    assert p.body == (
        "### User Input: \nCan you predict the next possible item the user may expect, given the following "
        "chronological interaction history: " + HIST_SIDS + "\n\n### Response:\n"
    )
    sft_style = P.eval_prompt(row.history_sids, row.item_sid, style="sft")
    assert sft_style.body == P.sid_next(row.history_sids, row.item_sid).body


def test_rl_prompts_are_body_only(industrial):
    cat, row, _ = industrial
    got = rl_prompts(cat, [row], ["sid_next", "title2sid", "seq_title2sid"], sample_seed=0, seq_title_sample=10)
    (sid_next,) = by_task(got, "sid_next")
    assert sid_next.text == (
        "### User Input: \nThe user has interacted with items " + HIST_SIDS + " in chronological order. "
        "Can you predict the next possible item that the user may expect?\n\n### Response:\n"
    )
    assert sid_next.target_sid == TARGET_SID
    title = by_task(got, "title2sid")[0]
    assert title.text == (
        "### User Input: \nWhich item has the title: SUPCO SPP6 Relay/Capacitor Hard Start Kit with 500% "
        "Increase Starting Torque?\n\n### Response:\n"
    )
    assert title.target_sid == "<a_236><b_231><c_226>"
    description = by_task(got, "description2sid")[0]
    assert description.text.startswith(
        '### User Input: \nAn item can be described as follows: "Relay/CAPACITOR hard start kit 500% incr starting torque,'
    )
    assert description.text.endswith('". Which item is it describing?\n\n### Response:\n')
    (seq,) = by_task(got, "seq_title2sid")
    assert seq.text == (
        "### User Input: \nGiven the title sequence of user historical interactive items: "
        f'"{T1}", "{T2}", "{T2}", "{T4}", can you recommend a suitable next item for the user?\n\n### Response:\n'
    )
    assert seq.target_sid == TARGET_SID
    assert all(not p.text.startswith("Below is") for p in got)
    # counts from reference §6.1: unique titles + unique non-empty descriptions
    assert len(by_task(got, "title2sid")) == 3646
    assert 2860 <= len(by_task(got, "description2sid")) <= 2870


def test_header_and_body_helpers():
    assert P.header("X") == PRE + "X\n\n"
    assert P.body("in") == "### User Input: \nin\n\n### Response:\n"
    assert P.quoted_titles_tab(["a", "b"]) == '"a",\t"b"'
    assert P.quoted_titles(["a", "b"]) == '"a", "b"'


def test_unknown_task_is_a_rec_error(synth_dataset_dir):
    from rec.errors import RecError

    cat = load_catalogue(synth_dataset_dir)
    with pytest.raises(RecError, match="data.tasks: unknown task 'bogus'"):
        sft_prompts(cat, [], ["bogus"], "x", 0)
    with pytest.raises(RecError, match="rl.tasks: unknown task"):
        rl_prompts(cat, [], ["sid2title"])
