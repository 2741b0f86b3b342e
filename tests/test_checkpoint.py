"""Bad input: every user mistake is one clear error naming the problem and the fix.

From Python each is a :class:`SwapMoEError` subclass; through the CLI, exit code 2 and one line on
stderr, no traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import swapmoe
import swapmoe.loader
from swapmoe import cli
from swapmoe.budget import parse_budget
from swapmoe.checkpoint import check_checkpoint
from swapmoe.errors import BudgetError, CheckpointError, SwapMoEError, UnsupportedModelError
from swapmoe.families import supported_families
from swapmoe.inspect import describe
from tests.threads import single_torch_thread
from tests.tiny_models import VOCAB, build_model, make_checkpoint, save_pickle_checkpoint, save_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid tiny Mixtral checkpoint (single file) with a tokenizer; tests copy it before breaking it."""
    path = make_checkpoint("mixtral", tmp_path_factory.mktemp("good") / "mixtral", layout="fused")
    return save_tokenizer(path)


@pytest.fixture(scope="module")
def good_sharded(tmp_path_factory):
    return make_checkpoint("mixtral", tmp_path_factory.mktemp("good") / "sharded", layout="fused", sharded=True)


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _raises(exc, path, *fragments, **kwargs):
    """``swapmoe.load(path)`` raises ``exc`` whose message holds every fragment; returns the message."""
    with pytest.raises(exc) as err:
        swapmoe.load(path, **{"device": "cpu", **kwargs})
    message = str(err.value)
    for f in fragments:
        assert f in message, f"{f!r} not in {message!r}"
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the directory
def test_missing_directory(tmp_path):
    _raises(CheckpointError, tmp_path / "nowhere", "does not exist", "config.json")


def test_a_file_instead_of_a_directory(good, tmp_path):
    _raises(CheckpointError, good / "config.json", "is a file, not a model directory")


def test_missing_config(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "config.json").unlink()
    _raises(CheckpointError, path, "no config.json")


def test_config_that_is_not_json(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "config.json").write_text("{not json")
    _raises(CheckpointError, path, "config.json is not valid JSON")


def test_config_without_model_type(good, tmp_path):
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    _raises(CheckpointError, path, "no 'model_type'")


def test_model_type_transformers_does_not_know(good, tmp_path):
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "no_such_moe"
    (path / "config.json").write_text(json.dumps(config))
    message = _raises(UnsupportedModelError, path, "no_such_moe")
    assert all(f in message for f in supported_families())


def test_config_but_no_weights(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "model.safetensors").unlink()
    _raises(CheckpointError, path, "no weights")


# ------------------------------------------------------------------------------ the weights
def test_missing_shard_named_in_the_index(good_sharded, tmp_path):
    path = _copy(good_sharded, tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    _raises(CheckpointError, path, "model-00002-of-00002.safetensors", "missing", "incomplete")


def test_index_listing_a_tensor_that_no_shard_holds(good_sharded, tmp_path):
    path = _copy(good_sharded, tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _raises(CheckpointError, path, "model.layers.9.mlp.gate.weight", "in no shard")


def test_malformed_index(good_sharded, tmp_path):
    path = _copy(good_sharded, tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _raises(CheckpointError, path, "not a valid safetensors index")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_corrupt_safetensors(good, good_sharded, tmp_path, damage, sharded):
    path = _copy(good_sharded if sharded else good, tmp_path)
    f = path / ("model-00001-of-00002.safetensors" if sharded else "model.safetensors")
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    _raises(CheckpointError, path, f.name, "corrupt or truncated")


def test_pickle_checkpoint_needs_an_explicit_opt_in(tmp_path):
    model = build_model("mixtral")
    path = save_pickle_checkpoint(model, tmp_path / "bin")
    _raises(CheckpointError, path, "pytorch_model.bin", "allow-pickle", "safetensors")
    with pytest.raises(CheckpointError):
        describe(path)
    # with the opt-in it loads, and is the same model
    loaded = swapmoe.load(path, "100%", device="cpu", dtype=torch.float32, allow_pickle=True)
    ids = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert describe(path, allow_pickle=True).model_type == "mixtral"


# ------------------------------------------------------------------------------- the budget
MALFORMED = ["abc", "12XB", "GiB", "-5GiB", "0", "0MiB", "150%", "0%", "%", "", "4 0MiB", "40 %%"]


@pytest.mark.parametrize("budget", MALFORMED)
def test_malformed_budget_string(budget):
    with pytest.raises(BudgetError) as err:
        parse_budget(budget)
    assert "budget" in str(err.value)


@pytest.mark.parametrize("budget", [True, 0, -3, 0.0, 1.5, -0.2])
def test_malformed_budget_value(budget):
    with pytest.raises(BudgetError):
        parse_budget(budget)


def test_malformed_budget_fails_before_loading(good, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the budget was checked")

    monkeypatch.setattr(swapmoe.loader, "_load_on_host", never)
    with pytest.raises(BudgetError, match="invalid memory budget"):
        swapmoe.load(good, "lots", device="cpu")


@pytest.mark.parametrize("budget", ["1KiB", "10%", "top-k minus one"])
def test_impossible_budget_names_the_minimum(good, budget):
    info = describe(good)
    minimum = info.minimum_budget  # top-k experts in every MoE layer
    assert minimum == sum(k * b for k, b in zip(info.top_k, info.expert_bytes, strict=True))
    if budget == "top-k minus one":
        budget = str(minimum - 1)
    message = _raises(BudgetError, good, "minimum", str(minimum), memory_budget=budget)
    assert f"--memory-budget {minimum}" in message


def test_minimum_budget_is_feasible(good):
    info = describe(good)
    model = swapmoe.load(good, str(info.minimum_budget), device="cpu")
    assert [st.num_slots for st in model.swapmoe.layers] == info.top_k
    assert model.swapmoe.stats()["total"]["resident_bytes"] == info.minimum_budget


def test_unusable_device_and_options(good):
    if not torch.cuda.is_available():
        _raises(CheckpointError, good, "no CUDA GPU", device="cuda")
    with pytest.raises(ValueError, match="strategy"):
        swapmoe.load(good, device="cpu", strategy="drop")


# ------------------------------------------------------------------------------ the CLI
def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err


CLI_CASES = {
    "missing directory (info)": (["info", "{tmp}/nowhere"], "does not exist"),
    "missing config": (["info", "{noconfig}"], "no config.json"),
    "corrupt safetensors": (["info", "{corrupt}"], "corrupt or truncated"),
    "pickle without opt-in": (["info", "{pickle}"], "--allow-pickle"),
    "unsupported model": (["info", "{dense}"], "Supported and tested"),
    "malformed budget": (["generate", "{good}", "-p", "a b", "-m", "12XB", "--device", "cpu"],
                         "invalid memory budget"),
    "impossible budget": (["generate", "{good}", "-p", "a b", "-m", "1KiB", "--device", "cpu"], "minimum"),
    "bad update interval": (["generate", "{good}", "-p", "a b", "--update-interval", "0", "--device", "cpu"],
                            "update_interval"),
}


@pytest.fixture(scope="module")
def broken(good, tmp_path_factory):
    from tests.tiny_models import make_dense_checkpoint

    root = tmp_path_factory.mktemp("broken")
    noconfig = root / "noconfig"
    shutil.copytree(good, noconfig)
    (noconfig / "config.json").unlink()
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 10)
    pickle = save_pickle_checkpoint(build_model("mixtral"), root / "pickle")
    dense = make_dense_checkpoint(root / "dense")
    return {"tmp": root, "noconfig": noconfig, "corrupt": corrupt, "pickle": pickle, "dense": dense, "good": good}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_user_errors_are_one_line_exit_2(capsys, broken, case):
    argv, fragment = CLI_CASES[case]
    rc, err = _cli(capsys, *[a.format(**broken) for a in argv])
    assert rc == cli.EXIT_USER_ERROR == 2
    assert "Traceback" not in err
    # transformers' own progress bar ("Loading weights: ...") may come first; the error is one line
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0]


def test_cli_generate_names_a_missing_directory(capsys, tmp_path):
    rc, err = _cli(capsys, "generate", str(tmp_path / "nowhere"), "-p", "a b")
    assert rc == 2 and "does not exist" in err


def test_cli_accepts_pickle_with_opt_in(capsys, broken):
    rc, _ = _cli(capsys, "info", str(broken["pickle"]), "--allow-pickle")
    assert rc == 0


def test_errors_are_swapmoe_errors():
    for exc in (CheckpointError, BudgetError, UnsupportedModelError):
        assert issubclass(exc, SwapMoEError)
    with pytest.raises(CheckpointError):
        check_checkpoint("/definitely/not/here")
