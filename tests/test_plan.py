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


def test_load_takes_a_plan_and_explicit_arguments_win(tmp_path):
    import swapmoe
    from tests.tiny_models import make_checkpoint

    ckpt = make_checkpoint("mixtral", tmp_path / "m")
    p = tmp_path / "plan.json"
    Plan(slots=[3, 5], update_interval=8, swaps_per_update=2, strategy="skip").save(p)
    model = swapmoe.load(ckpt, plan=p)
    rt = model.swapmoe
    assert [st.num_slots for st in rt.layers] == [3, 5]
    assert (rt.config.strategy, rt.config.update_interval, rt.config.swaps_per_update) == ("skip", 8, 2)
    assert rt.stats()["total"]["resident_bytes"] == 8 * rt.layers[0].layer.expert_bytes()
    assert swapmoe.load(ckpt, plan=p, strategy="exchange").swapmoe.config.strategy == "exchange"
    with pytest.raises(PlanError, match="not both"):
        swapmoe.load(ckpt, "50%", plan=p)
