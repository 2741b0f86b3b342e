"""``swapmoe info``: what a checkpoint's budgets mean, from its config alone (no weight is loaded)."""

from __future__ import annotations

import pytest
import torch

from swapmoe import cli
from swapmoe.families import FAMILY_RULES, find_moe_layers
from swapmoe.inspect import describe
from tests.tiny_models import FAMILIES, layouts, make_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    # the published layout: per-expert names where a family has them, else fused (gpt-oss)
    return {f: make_checkpoint(f, root / f, layout=layouts(f)[0]) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_matches_the_loaded_model(checkpoints, family, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = checkpoints[family]
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = find_moe_layers(plain)
    cfg = plain.config

    def no_weights(*args, **kwargs):
        raise AssertionError("describe must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    info = describe(path)

    assert info.model_type == family
    assert info.routing.startswith(FAMILY_RULES[family])
    assert info.num_layers == cfg.num_hidden_layers
    assert info.moe_layers == [la.name for la in layers]
    # DeepSeek, GLM4, Ernie and AFMoE keep dense first layers: 2 MoE layers of 3
    assert len(info.moe_layers) == 2 and info.num_layers == (3 if family in (
        "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "afmoe") else 2)
    assert info.num_experts == [8, 8] and info.top_k == [2, 2]
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    # gpt-oss experts also carry biases: gate_up [2I] and down [H]; describe counts them like the loader
    biases = 2 * inter + cfg.hidden_size if family == "gpt_oss" else 0
    assert info.expert_bytes == [(3 * cfg.hidden_size * inter + biases) * 4] * 2  # gate, up, down; float32
    assert info.expert_bytes == [la.expert_bytes() for la in layers]
    expert_ids = {id(getattr(la.experts, n)) for la in layers for n in la.expert_param_names}
    other = sum(t.numel() * t.element_size() for t in list(plain.parameters()) + list(plain.buffers())
                if id(t) not in expert_ids)
    assert info.other_bytes == other
    assert info.total_expert_bytes == 16 * info.expert_bytes[0]
    assert info.minimum_budget == 4 * info.expert_bytes[0]
    assert info.slots_for(0.5) == [4, 4]
    assert info.slots_for(1.0) == [8, 8]
    assert info.slots_for(0.01) == [2, 2]  # never below top-k


def test_cli_info_prints_what_budgets_mean(checkpoints, capsys):
    path = checkpoints["qwen2_moe"]
    assert cli.main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    assert "qwen2_moe" in err
    assert "8 experts per MoE layer, top-2" in err
    assert "minimum budget" in err and "25.0%" in err
