"""Preference rows → cleaned pairs, for the three shapes they ship in, with the reject reasons that
`prepare` counts; the verifiable sum task and its checker."""

import json

import pytest

from rayllm.config import DataConfig
from rayllm.data.clean import REJECT_REASONS
from rayllm.data.preference import clean_preference, parse_hh
from rayllm.data.verifiable import follows_rule, pairs

CFG = DataConfig(inputs=["x"], output_dir="y", mode="preference")
Q, A, B = "What is 2 + 2?", "= 4", "5"
EXPECTED = {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}],
            "rejected": [{"role": "assistant", "content": B}]}


def _msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


@pytest.mark.parametrize("record", [
    {"prompt": Q, "chosen": A, "rejected": B},  # strings
    {"prompt": _msgs(("user", Q)), "chosen": _msgs(("assistant", A)), "rejected": _msgs(("assistant", B))},  # TRL conversational
    {"prompt": Q, "chosen": _msgs(("user", Q), ("assistant", A)), "rejected": _msgs(("user", Q), ("assistant", B))},  # UltraFeedback
    {"prompt": Q, "chosen": json.dumps(_msgs(("user", Q), ("assistant", A))),
     "rejected": json.dumps(_msgs(("user", Q), ("assistant", B)))},  # nested data as JSON strings (parquet)
    {"chosen": _msgs(("user", Q), ("assistant", A)), "rejected": _msgs(("user", Q), ("assistant", B))},  # HH as messages
    {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {A}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {B}"},  # HH as shipped
], ids=["strings", "conversational", "ultrafeedback", "json-strings", "hh-messages", "hh-text"])
def test_every_shape_becomes_the_same_pair(record):
    got = clean_preference(record, CFG)
    assert got.reject == "" and json.loads(got.content) == EXPECTED


def test_a_response_that_merely_looks_like_a_list_is_text():
    got = json.loads(clean_preference({"prompt": Q, "chosen": "[1, 2]", "rejected": "[3]"}, CFG).content)
    assert got["chosen"] == _msgs(("assistant", "[1, 2]"))


def test_hh_keeps_earlier_turns_in_the_prompt_and_system_prompt_applies_to_strings():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    got = json.loads(clean_preference({"chosen": chosen, "rejected": chosen[:-1] + "5"}, CFG).content)
    assert got["prompt"] == _msgs(("user", "hi"), ("assistant", "hello"), ("user", "2+2?")) and got["chosen"] == _msgs(("assistant", "4"))
    assert parse_hh("no markers here") is None
    cfg = DataConfig(inputs=["x"], output_dir="y", mode="preference", system_prompt="be brief")
    got = json.loads(clean_preference({"prompt": Q, "chosen": _msgs(("user", Q), ("assistant", A)), "rejected": B}, cfg).content)
    assert got["prompt"] == _msgs(("system", "be brief"), ("user", Q)) and got["chosen"] == EXPECTED["chosen"]


@pytest.mark.parametrize("record,reason", [
    ({"prompt": Q, "chosen": A}, "missing_field"),
    ({"prompt": Q, "rejected": B, "chosen": None}, "missing_field"),
    ({"prompt": "  ", "chosen": A, "rejected": B}, "missing_field"),
    ({"prompt": Q, "chosen": A, "rejected": f"  {A} "}, "identical"),
    ({"prompt": Q, "chosen": 4, "rejected": B}, "wrong_type"),
    ({"prompt": Q, "chosen": '[{"role": "assistant", "content": 4]', "rejected": B}, "wrong_type"),
    ({"prompt": Q, "chosen": [{"role": "robot", "content": A}], "rejected": B}, "bad_messages"),
    ({"prompt": Q, "chosen": _msgs(("assistant", A), ("user", "and?")), "rejected": B}, "bad_messages"),
    ({"chosen": _msgs(("user", "a"), ("assistant", A)), "rejected": _msgs(("user", "b"), ("assistant", B))}, "bad_messages"),
    ({"chosen": A, "rejected": B}, "bad_messages"),
    ([Q, A, B], "invalid_json"),
])
def test_bad_rows_are_rejected_with_a_named_reason(record, reason):
    got = clean_preference(record, CFG)
    assert got.reject == reason and got.detail and reason in REJECT_REASONS


def test_the_verifiable_task_is_deterministic_and_its_checker_separates_each_pair():
    a, b = pairs(50, seed=3), pairs(50, seed=3)
    assert a == b and len({json.dumps(r["prompt"]) for r in a}) == 50
    for r in a:
        question = r["prompt"][-1]["content"]
        assert follows_rule(question, r["chosen"]) and not follows_rule(question, r["rejected"])
        assert clean_preference(r, CFG).reject == ""
    assert follows_rule("What is 12 + 30?", " = 42\n") and not follows_rule("What is 12 + 30?", "= 42, I think")
    with pytest.raises(ValueError, match="at most 100"):
        pairs(101, high=10)
