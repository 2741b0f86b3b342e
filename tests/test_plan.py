"""Plan files: read back what `swapmoe plan` writes, reject what would mislead a run."""

import json

import pytest

from swapmoe.errors import PlanError
from swapmoe.plan import Plan, read_plan


def test_round_trip(tmp_path):
    p = tmp_path / "plan.json"
    Plan(slots=[4, 3], update_interval=8, swaps_per_update=2, strategy="skip", meta={"budget": "50%"}).save(p)
    plan = read_plan(p)
    assert plan.slots == [4, 3] and plan.update_interval == 8 and plan.swaps_per_update == 2
    assert plan.strategy == "skip" and plan.meta == {"budget": "50%"}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"slots": []}), "'slots'"),
        (json.dumps({"slots": [2, 0]}), "'slots'"),
        (json.dumps({"slots": [2, "3"]}), "'slots'"),
        (json.dumps({"slots": [2], "update_interval": 0}), "'update_interval'"),
        (json.dumps({"slots": [2], "swaps_per_update": -1}), "'swaps_per_update'"),
        (json.dumps({"slots": [2], "strategy": "drop"}), "'strategy'"),
        (json.dumps({"slots": [2], "slot": [3]}), "unknown field"),
    ],
)
def test_bad_plans_are_rejected_naming_the_field(tmp_path, content, fragment):
    p = tmp_path / "plan.json"
    p.write_text(content)
    with pytest.raises(PlanError, match=fragment):
        read_plan(p)


def test_missing_plan_file_says_how_to_make_one(tmp_path):
    with pytest.raises(PlanError, match="swapmoe plan"):
        read_plan(tmp_path / "nope.json")
