"""The walk over every MoE model type the installed transformers registers (tests/test_family_walk.py,
scripts/families_table.py).

For each model type whose modeling classes include an experts module (or whose config names experts),
:func:`walk` builds a tiny random model from the family's own default config shrunk to a few thousand
parameters (:func:`tiny_config`), saves it as a user would have it, and loads it through swapmoe:

* **supported**: at a 100% budget the logits equal plain transformers' bit for bit (an adapter that
  computes per expert instead of transformers' one batched product: to float rounding), and at a 50%
  budget a forward pass runs with the resident expert bytes within the budget. "tested" when the
  family is in the tested matrix with a routing rule of its own, "recognised" otherwise;
* **refused**: swapmoe stops with its one-line :class:`~swapmoe.errors.UnsupportedModelError`.

Every registered MoE model type must appear in :data:`EXPECTED`, so a family that a new transformers
release adds shows up as a failing test naming it, not as a user's surprise.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# What each MoE model type is expected to do under swapmoe. "tested": supported, in the tested matrix
# (tests/test_loader.py, tests/adapters) with a routing rule or an adapter of its own; "recognised": supported
# (exact at 100%, runs within a budget) with a borrowed rule or generic substitution; "refused": one
# line saying why. Model types the installed transformers lacks are not walked.
EXPECTED: dict[str, str] = {
    # tested
    "afmoe": "tested", "dbrx": "tested", "jetmoe": "tested", "longcat_flash": "tested",
    "deepseek_v2": "tested", "deepseek_v3": "tested", "ernie4_5_moe": "tested",
    "glm4_moe": "tested", "gpt_oss": "tested", "granitemoe": "tested", "hunyuan_v1_moe": "tested",
    "llama4": "tested", "llama4_text": "tested", "mixtral": "tested", "olmoe": "tested", "phimoe": "tested",
    "qwen2_moe": "tested", "qwen3_moe": "tested", "switch_transformers": "tested",
    # recognised
    "aria_text": "recognised", "axk1": "recognised", "axk2": "recognised", "bailing_hybrid": "recognised",
    "beam": "recognised", "cohere2_moe": "recognised", "deepseek_v32": "recognised",
    "deepseek_v4": "recognised", "dots1": "recognised", "dots3_note": "recognised",
    "dots3_note_text": "recognised", "exaone_moe": "recognised", "flex_olmo": "recognised",
    "flint": "recognised", "gemma4": "recognised", "gemma4_text": "recognised",
    "glm4_moe_lite": "recognised", "glm_moe_dsa": "recognised", "granitemoe_swa": "recognised",
    "granitemoehybrid": "recognised", "granitemoeshared": "recognised", "hy_v3": "recognised",
    "hy_v4": "recognised", "inkling2_loop_text": "recognised", "inkling2_text": "recognised",
    "jamba": "recognised", "kimi_linear": "recognised", "kolibri1": "recognised", "laguna": "recognised",
    "lara_mini": "recognised", "lfm2_moe": "recognised", "mellum": "recognised",
    "mimo_v2_flash": "recognised", "minimax": "recognised", "minimax_m2": "recognised",
    "minimax_m3_vl_text": "recognised", "nemotron_h": "recognised", "qwen3_5_moe": "recognised",
    "qwen3_5_moe_text": "recognised", "qwen3_next": "recognised", "qwen4_exp": "recognised",
    "qwen4_exp_text": "recognised", "sarvam_mla": "recognised", "sarvam_moe": "recognised",
    "solar_open": "recognised",
    # refused
    "aria": "refused", "deepseek_ocr2": "refused", "deepseek_ocr2_text": "refused",
    "doge": "refused", "dots3_note_vision_encoder": "refused", "ernie4_5_vl_moe": "refused",
    "ernie4_5_vl_moe_text": "refused", "glm4v_moe": "refused", "glm4v_moe_text": "refused",
    "glm5_next": "refused", "glm5_next_text": "refused", "hy_v4_vl": "refused", "hy_v4_vl_text": "refused",
    "inkling2": "refused", "inkling2_loop": "refused", "inkling_mm_model": "refused",
    "inkling_text": "refused", "minimax_m3_vl": "refused",
    "mistral4": "refused", "mistral_large4": "refused", "mistral_large4_text": "refused",
    "muse_spark": "refused", "muse_spark_text": "refused", "nllb-moe": "refused",
    "openai_privacy_filter": "refused", "qwen3_omni_moe_talker_text": "refused",
    "qwen3_omni_moe_text": "refused", "qwen3_omni_moe_thinker": "refused", "qwen3_vl_moe": "refused",
    "qwen3_vl_moe_text": "refused", "step3p5": "refused", "step3p7": "refused", "unlimited_ocr": "refused",
    "unlimited_ocr_text": "refused", "zaya": "refused",
}

# Where an older transformers release (measured on 5.17, the GPU machine's) behaves otherwise: there
# Aria's text model keeps its experts in another form, and Jamba's router is a bare Linear whose
# block routes itself (no hook point), so both are refused.
_BEFORE_5_24: dict[str, str] = {"aria_text": "refused", "jamba": "refused"}


def expected(model_type: str) -> str | None:
    """What ``model_type`` must do under swapmoe with the installed transformers (None: not walked yet)."""
    from packaging.version import Version

    if Version(installed_transformers()) < Version("5.24") and model_type in _BEFORE_5_24:
        return _BEFORE_5_24[model_type]
    return EXPECTED.get(model_type)


# Shrunk sizes for every key a family's config has (and its text config): a few thousand parameters.
_TINY: dict[str, Any] = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
    "moe_intermediate_size": 24, "shared_expert_intermediate_size": 24, "shared_intermediate_size": 24,
    "expert_intermediate_size": 24, "ffn_hidden_size": 48,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "index_head_dim": 8, "index_n_heads": 2, "linear_head_dim": 8, "linear_num_heads": 4,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8, "unpadded_vocab_size": 96,
    "sliding_window": 4, "tie_word_embeddings": False,
    # encoder-decoders (Switch, NLLB-MoE), DBRX, LongCat-Flash, Gemma 4 by their own names
    "d_model": 32, "d_ff": 48, "d_kv": 8, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
    "zero_expert_num": 2, "expert_ffn_hidden_size": 24, "top_k_experts": 2,
    "vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8,
}
# keys to_dict() writes into a sub-config that some sub-config classes refuse back (DBRX's in 5.17)
_SERIALISED = frozenset({"output_attentions", "output_hidden_states", "return_dict", "transformers_version"})
# Prompts use token ids below this; a multimodal family's special tokens (image, audio) get the ids above.
PROMPT_IDS = 64
# Per model type: settings the generic shrinking gets wrong for it (applied last).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "glm5_next": {"text_config": {"num_key_value_heads": 4}},
    "glm5_next_text": {"num_key_value_heads": 4},
    "dots3_note": {"text_config": {"head_dim": 16}},  # sliding layers: = qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_text": {"head_dim": 16},
    "zaya": {"num_experts_per_tok": 1},  # the only top-k it supports
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},  # its default is None
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2,
                         "mamba_n_heads": 8,
                         "mamba_d_head": 8, "mamba_d_state": 8, "mamba_chunk_size": 8},
    # an attention layer and a Mamba layer, the second one MoE
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2, "expert_layer_offset": 1},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0},  # as published
             "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 2}},
    "gemma4_text": {"enable_moe_block": True},  # off by default: the MoE variant switches it on
    "gemma4": {"text_config": {"enable_moe_block": True}},
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                                  "indexer_budget": 8, "indexer_compress_ratio": 4}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
}


@dataclass(frozen=True)
class WalkResult:
    model_type: str
    status: str  # "tested", "recognised" or "refused"
    detail: str  # the routing rule, or the one-line error
    moe_layers: int = 0
    exact: str = ""  # "bit-identical" or "float rounding" at 100%

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_of(class_name: str) -> str | None:
    """The transformers modeling module (e.g. ``glm4_moe``) defining ``class_name``, read without import."""
    import transformers

    path = getattr(sys.modules["transformers"], "_class_to_module", {}).get(class_name)
    if path is None:
        return None
    mod = path.rsplit(".", 1)[-1].replace("modeling_", "")
    return mod if (Path(transformers.__file__).parent / "models" / mod).is_dir() else None


_MOE_CLASS = re.compile(r"^class (\w*?(Experts|Moe|MoE|SparseMLP|MoeBlock|TopKGating))\(", re.M)


def _has_moe_classes(module: str) -> bool:
    import transformers

    f = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return f.is_file() and _MOE_CLASS.search(f.read_text(encoding="utf-8")) is not None


def lm_class_name(model_type: str) -> str | None:
    """The causal-LM (or seq2seq) class transformers' Auto classes build for ``model_type``."""
    from transformers.models.auto import modeling_auto as ma

    return (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
            or ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type))


def _names_experts(config) -> bool:
    """Whether a config (or its text config) sets a number of experts above 1."""
    for c in (config, getattr(config, "text_config", None)):
        if c is None:
            continue
        for k, v in c.to_dict().items():
            if "expert" in k and "per_tok" not in k and "shared" not in k and isinstance(v, int) and v > 1:
                return True
    return False


def moe_model_types() -> list[str]:
    """Every MoE model type the installed transformers registers, sorted.

    A model type whose LM class (or, without one, whose own modeling module) defines an experts
    module or MoE block; one without an LM class counts only if its config names experts (so the
    vision or audio sub-configs of a multimodal MoE are left out).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    out = []
    for mt in CONFIG_MAPPING_NAMES:
        cls = lm_class_name(mt)
        module = (_module_of(cls) if cls else None) or model_type_to_module_name(mt)
        if not _has_moe_classes(module):
            continue
        if cls is None:
            try:
                if not _names_experts(AutoConfig.for_model(mt)):
                    continue
            except Exception:  # noqa: BLE001 (a config that cannot be built with defaults: still walked)
                pass
        out.append(mt)
    return sorted(out)


def _is_layer_index_list(v: Any, n: int) -> bool:
    return isinstance(v, list) and 0 < len(v) < n and all(isinstance(i, int) and 0 <= i < n for i in v)


def _shrink_layers(d: dict[str, Any]) -> dict[str, Any]:
    """Fewer layers, keeping one of each kind the family has.

    Per-layer lists (``layer_types``, ``mlp_layer_types``, ...) and dicts keyed by layer index are
    cut to a few layers chosen so that every combination of per-layer kinds occurs once (the last
    layer stays last: some families require it to be full attention); lists of layer indices
    (``mlp_only_layers``) are renumbered.
    """
    out = dict(d)
    n = out.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 2:
        return out
    per_layer = [k for k, v in out.items() if isinstance(v, list) and len(v) == n]
    index_lists = [k for k, v in out.items() if _is_layer_index_list(v, n)]
    keyed = [k for k, v in out.items() if isinstance(v, dict) and v and all(str(i).isdigit() for i in v)]
    if not (per_layer or index_lists or keyed):
        out["num_hidden_layers"] = 2
        return out

    def kind(i: int) -> tuple:
        return (tuple(str(out[k][i]) for k in per_layer) + tuple(i in out[k] for k in index_lists)
                + tuple(i in {int(j) for j in out[k]} for k in keyed))

    kept: dict[tuple, int] = {}
    for i in range(n - 1):
        kept.setdefault(kind(i), i)
    keep = sorted({*kept.values(), n - 1})
    if len(keep) < 2:
        keep = [0, n - 1]
    new_index = {old: new for new, old in enumerate(keep)}
    for k in per_layer:
        out[k] = [out[k][i] for i in keep]
    for k in index_lists:
        out[k] = [new_index[i] for i in out[k] if i in new_index]
    for k in keyed:
        out[k] = {type(j)(new_index[int(j)]) if isinstance(j, int) else str(new_index[int(j)]): v
                  for j, v in out[k].items() if int(j) in new_index}
    out["num_hidden_layers"] = len(keep)
    return out


def _shrink(d: dict[str, Any], top: bool) -> dict[str, Any]:
    out = _sizes(_shrink_layers(d), top)
    for k, v in list(out.items()):
        if isinstance(v, dict) and k.endswith("_config"):  # a sub-config: without what to_dict() adds
            v = out[k] = {j: c for j, c in v.items() if not j.startswith("_") and j not in _SERIALISED}
        if isinstance(v, dict) and ("hidden_size" in v or "num_hidden_layers" in v) and k.endswith("_config"):
            out[k] = _shrink(v, top=k == "text_config")
        elif isinstance(v, dict) and v and all(str(j).isdigit() and isinstance(c, dict) for j, c in v.items()):
            out[k] = {j: _sizes(c, top=False) for j, c in v.items()}  # per-layer settings (Dots3)
    return out


def _sizes(d: dict[str, Any], top: bool) -> dict[str, Any]:
    """:data:`_TINY` sizes for the keys ``d`` has, and what they imply."""
    out = dict(d)
    if top:  # special tokens inside the tiny vocabulary, above the ids prompts use (PROMPT_IDS)
        out.update({k: None if k == "eos_token_id" else {"pad_token_id": 0, "bos_token_id": 1}.get(k, v)
                    for k, v in out.items() if k in ("pad_token_id", "bos_token_id", "eos_token_id")})
        special = [k for k, v in out.items() if k.endswith("_token_id") and isinstance(v, int) and v >= PROMPT_IDS]
        out.update({k: PROMPT_IDS + i for i, k in enumerate(sorted(special))})
    for k, v in _TINY.items():
        if k in out and k != "num_hidden_layers" and (top or "vocab_size" not in k) and out[k] != 0:
            old = out[k]  # 0 stays 0: a switched-off part (GLM-5's attention without RoPE)  # a per-layer list (Ernie 4.5 VL's moe_intermediate_size) stays a list
            out[k] = [v] * len(old) if isinstance(old, list) and not isinstance(v, list) else v
    if not top and "num_attention_heads" in out and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # encoders: no grouped-query attention
    for k in ("text_hidden_size", "out_hidden_size", "adapter_out_dim"):  # what a tower hands the text model
        if k in out and not top:
            out[k] = _TINY["hidden_size"]
    for k in ("adapter_in_dim", "adapter_input_size"):  # a tower's adapter reads the tower's own width
        if k in out:
            out[k] = out.get("hidden_size", _TINY["hidden_size"])
    if "kv_lora_rank" in out or "qk_nope_head_dim" in out:  # latent attention: as many kv as query heads
        out["num_key_value_heads"] = out.get("num_attention_heads", _TINY["num_attention_heads"])
        if out.get("head_dim"):
            out["head_dim"] = _TINY["qk_rope_head_dim"]  # the rotary part
    if out.get("n_shared_experts", 0) is None:
        out["n_shared_experts"] = 1
    if "qk_head_dim" in out:
        out["qk_head_dim"] = out.get("qk_nope_head_dim", 0) + out.get("qk_rope_head_dim", 0)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope:  # (time, height, width) halves of 8 rotary dims
        out["rope_parameters"] = {**rope, "mrope_section": [2, 1, 1]}
    return out


def tiny_config(model_type: str):
    """The family's default config, shrunk (see :data:`_TINY`), with :data:`_OVERRIDES` on top."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type).to_dict()
    kw = _shrink({k: v for k, v in base.items() if not k.startswith("_") and k not in (
        "transformers_version", "architectures", "model_type")}, top=True)
    for k, v in _OVERRIDES.get(model_type, {}).items():
        if isinstance(v, dict) and isinstance(kw.get(k), dict):
            kw[k] = {**kw[k], **v}
        else:
            kw[k] = v
    return AutoConfig.for_model(model_type, **kw)


def _widen_routers(model) -> None:
    """Routers start near zero (std 0.02): widen them so routing is decisive, as the matrix does."""
    from swapmoe.families import find_moe_layers

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for la in find_moe_layers(model):
            w = la.router_weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)


def _save_refusable(config, path: Path) -> None:
    """A checkpoint of a model type without an LM class: its config and a token weights file (swapmoe
    refuses it from the config, before any weight is read)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))


def _plain(path: Path):
    from transformers import AutoConfig

    from swapmoe.families import auto_model_class

    config = AutoConfig.from_pretrained(path)
    return auto_model_class(config).from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(ids).logits


def walk(model_type: str, root: Path) -> WalkResult:
    """Build, save and load a tiny ``model_type`` through swapmoe; see the module docstring."""
    import swapmoe
    from swapmoe.errors import UnsupportedModelError
    from swapmoe.families import auto_model_class, find_moe_layers, supported_families

    path = root / model_type
    config = tiny_config(model_type)
    if lm_class_name(model_type) is None:
        _save_refusable(config, path)
    else:
        torch.manual_seed(0)
        model = auto_model_class(config).from_config(config, dtype=torch.float32).eval()
        _widen_routers(model)
        model.save_pretrained(path)
        del model
    try:
        full = swapmoe.load(path, "100%", device="cpu", dtype=torch.float32)
    except UnsupportedModelError as e:
        return WalkResult(model_type, "refused", str(e))
    plain = _plain(path)
    ids = torch.randint(2, PROMPT_IDS, (2, 8), generator=torch.Generator().manual_seed(0))
    out, ref = _logits(full, ids), _logits(plain, ids)
    if not torch.equal(out, ref):  # weights an adapter stacked live in fresh (aligned) memory: compare alike
        for p in plain.parameters():
            p.data = p.data.clone()
        ref = _logits(plain, ids)
    if torch.equal(out, ref):
        exact = "bit-identical"
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        exact = "float rounding"
    half = swapmoe.load(path, "50%", device="cpu", dtype=torch.float32, update_interval=1)
    assert torch.isfinite(_logits(half, ids)).all()
    stats = half.swapmoe.stats()["total"]
    assert stats["resident_bytes"] <= stats["budget_bytes"] < stats["total_expert_bytes"]
    st = half.swapmoe.layers[0]
    rule = st.rule.__name__ if st.rule is not None else "generic substitution"
    status = "tested" if model_type in supported_families() else "recognised"
    layers = len(find_moe_layers(full))
    return WalkResult(model_type, status, rule, layers, exact)


def write_results(results: list[WalkResult], path: Path) -> None:
    path.write_text(json.dumps([r.as_dict() for r in results], indent=1) + "\n")


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":  # a quick look: python -m tests.family_walk [MODEL_TYPE ...]
    import tempfile
    import time

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for mt in sys.argv[1:] or moe_model_types():
            start = time.perf_counter()
            try:
                r = walk(mt, Path(tmp))
                took = time.perf_counter() - start
                print(f"{mt:28s} {took:5.2f}s {r.status:10s} {r.exact:14s} {r.detail.splitlines()[0][:100]}", flush=True)
            except Exception as e:  # noqa: BLE001
                msg = str(e).splitlines()[0][:150] if str(e) else ""
                print(f"{mt:28s} FAILED     {type(e).__name__}: {msg}", flush=True)
    os.sys.exit(0)
