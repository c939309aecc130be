"""Reward functions (recommendation and GSM8K) against hand-computed values."""

import json
import math

import numpy as np
import pytest

from rec.data.gsm8k import (
    extract_final_number,
    find_numbers,
    parse_jsonl,
    read_gsm8k,
    synthetic_problems,
)
from rec.errors import RecError
from rec.train import rewards as R


def test_rank_weights_g4_by_hand():
    # 1/log2(r+2) for r=0..3: 1, 0.630930, 0.5, 0.430677; sum 2.561607
    expected = np.array([1.0, 0.6309298, 0.5, 0.4306766]) / 2.5616064
    np.testing.assert_allclose(R.rank_weights(4), expected, rtol=1e-6)


def test_rank_weights_g16_match_upstream_table():
    # reference/minionerec-upstream.md §6.3: sum of discounts 6.10600 and the printed weights
    upstream = [0.1638, 0.1033, 0.0819, 0.0705, 0.0634, 0.0583, 0.0546, 0.0517,
                0.0493, 0.0473, 0.0457, 0.0443, 0.0430, 0.0419, 0.0409, 0.0401]
    w = R.rank_weights(16)
    np.testing.assert_allclose(w, upstream, atol=6e-5)
    assert w.sum() == pytest.approx(1.0)
    assert sum(1 / math.log2(r + 2) for r in range(16)) == pytest.approx(6.10600, abs=1e-5)


def test_rule_and_ranking_rewards_by_hand():
    completions = [
        ["<a_1><b_2><c_3>", "<a_1><b_2><c_4>\n", "<a_2><b_1><c_1>", "<a_3><b_3><c_3>"],
        ["<a_9><b_9><c_9>", "<a_8><b_8><c_8>", "<a_7><b_7><c_7>", "<a_6><b_6><c_6>"],
        ['"<a_5><b_5><c_5>"', "<a_4><b_4><c_4>", "<a_3><b_3><c_3>", "<a_2><b_2><c_2>"],
    ]
    targets = ["<a_1><b_2><c_4>\n", "<a_1><b_1><c_1>\n", "<a_5><b_5><c_5>"]
    hits = R.sid_hits(completions, targets)
    assert hits.tolist() == [[False, True, False, False], [False] * 4, [True, False, False, False]]
    w = [0.3903800, 0.2463024, 0.1951900, 0.1681276]  # discounts / 2.5616064
    rule = [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    ranking_only = [[-w[0], 0, -w[2], -w[3]], [0, 0, 0, 0], [0, -w[1], -w[2], -w[3]]]
    total, terms = R.recommendation_rewards(hits, "ranking")
    np.testing.assert_allclose(terms["rule"], rule)
    np.testing.assert_allclose(terms["ranking_only"], ranking_only, atol=1e-6)
    np.testing.assert_allclose(total, np.array(rule) + np.array(ranking_only), atol=1e-6)
    # the penalties of a group with a hit and the hit itself: 1 - sum of the miss weights
    assert total[0].sum() == pytest.approx(1 - w[0] - w[2] - w[3], abs=1e-6)

    total_rule, terms_rule = R.recommendation_rewards(hits, "rule")
    np.testing.assert_allclose(total_rule, rule)
    assert list(terms_rule) == ["rule"]
    total_only, _ = R.recommendation_rewards(hits, "ranking_only")
    np.testing.assert_allclose(total_only, ranking_only, atol=1e-6)


def test_ranking_reward_weights():
    hits = np.array([[False, True]])
    w0 = 1 / (1 + 1 / math.log2(3))
    total, _ = R.recommendation_rewards(hits, "ranking", [2.0, 0.5])
    np.testing.assert_allclose(total, [[-0.5 * w0, 2.0]], atol=1e-6)
    with pytest.raises(RecError, match="rl.reward_weights"):
        R.recommendation_rewards(hits, "ranking", [1.0])
    with pytest.raises(RecError, match="rl.reward"):
        R.recommendation_rewards(hits, "semantic")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$1,234.50 dollars", [1234.5]),
        ("-5 apples and +3 pears", [-5.0, 3.0]),
        ("3-5=-2", [3.0, 5.0, -2.0]),
        ("she is 42.", [42.0]),
        (".5 of 1/4", [0.5, 0.25]),
        ("-$3 or \u22127", [-3.0, -7.0]),
        ("12% of 5km", [12.0, 5.0]),
        ("x2 and v1.5 cost 3", [3.0]),
        ("1, 2, 3", [1.0, 2.0, 3.0]),
        ("no numbers here", []),
    ],
)
def test_find_numbers(text, expected):
    assert find_numbers(text) == expected


def test_extract_final_number_prefers_answer_mark():
    assert extract_final_number("5 + 6 = 11\n#### 11\nQuestion: 3 + 4") == 11.0
    assert extract_final_number("5 + 6 = 11, so the answer is $11.") == 11.0
    assert extract_final_number("#### \nIt is 7") == 7.0  # nothing after the mark: last number
    assert extract_final_number("I do not know") is None


def test_gsm8k_rewards_by_hand():
    completions = [
        "2 * 9 = 18\n#### 18",  # correct, formatted
        "She makes $18.00 a day.",  # correct (last number), no answer line
        "#### 1,000\n",  # correct with a thousands separator, formatted
        "#### 17\n#### 18",  # correct by the last mark, but two marks: not formatted
        "#### 19",  # formatted, wrong
        "#### eighteen",  # neither
    ]
    golds = [18.0, 18.0, 1000.0, 18.0, 18.0, 18.0]
    total, terms = R.gsm8k_rewards(completions, golds, [1.0, 0.5])
    np.testing.assert_array_equal(terms["correctness"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(terms["format"], [1, 0, 1, 0, 1, 0])
    np.testing.assert_allclose(total, [1.5, 1.0, 1.5, 1.0, 0.5, 0.0])
    with pytest.raises(RecError, match="grpo.reward_weights"):
        R.gsm8k_rewards(completions, golds, [1.0, 0.5, 0.5])


def test_gsm8k_jsonl_errors_name_file_and_line():
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    assert parse_jsonl(good + "\n\n" + good, "x.jsonl")[1].answer == 2.0
    with pytest.raises(RecError, match=r"^x.jsonl:2: not valid JSON"):
        parse_jsonl(good + "\n{oops", "x.jsonl")
    with pytest.raises(RecError, match=r"^x.jsonl:1: missing or empty 'question'"):
        parse_jsonl(json.dumps({"answer": "#### 2"}), "x.jsonl")
    with pytest.raises(RecError, match=r"^x.jsonl:1: 'answer' has no '####"):
        parse_jsonl(json.dumps({"question": "q", "answer": "2"}), "x.jsonl")
    with pytest.raises(RecError, match=r"^x.jsonl:1: no number after"):
        parse_jsonl(json.dumps({"question": "q", "answer": "#### two"}), "x.jsonl")


def test_read_gsm8k_missing_split(tmp_path):
    with pytest.raises(RecError, match="train.jsonl"):
        read_gsm8k(str(tmp_path), "train")


def test_real_gsm8k_parses(gsm8k_dir):
    test = read_gsm8k(str(gsm8k_dir), "test")
    assert len(test) == 1319
    assert test[0].answer == 18.0
    train = read_gsm8k(str(gsm8k_dir), "train", limit=50)
    assert len(train) == 50
    # every gold solution earns both rewards against itself
    total, _ = R.gsm8k_rewards([p.solution for p in test], [p.answer for p in test], [1.0, 0.5])
    assert total.mean() > 0.99


def test_synthetic_problems_deterministic_and_solved_by_their_solutions():
    a, b = synthetic_problems(20, seed=3), synthetic_problems(20, seed=3)
    assert a == b and len({p.question for p in a}) > 10
    total, terms = R.gsm8k_rewards([p.solution for p in a], [p.answer for p in a], [1.0, 0.5])
    assert terms["correctness"].all() and terms["format"].all()
