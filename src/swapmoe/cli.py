"""The ``swapmoe`` command line: info, generate, eval-ppl, serve, eval, sweep, trace.

User errors (:class:`swapmoe.errors.SwapMoEError`) print as one line on stderr with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from swapmoe.budget import format_bytes
from swapmoe.errors import SwapMoEError
from swapmoe.fused import DEFAULT_MOE_KERNEL, MOE_KERNELS
from swapmoe.quant import FORMATS

EXIT_USER_ERROR = 2


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or Hugging Face repo id org/name (default: the bundled reference model)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repo id (default: main)")
    p.add_argument("--memory-budget", "-m", default=None,
                   help="device memory for expert weights: bytes ('6GiB', '512MiB') or a share ('40%%'); default 100%%")
    p.add_argument("--plan", default=None, help="plan.json from `swapmoe plan` (instead of --memory-budget)")
    p.add_argument("--host-budget", default=None,
                   help="host memory for expert weights ('20GiB', '50%%'); the rest stay in the safetensors files")
    p.add_argument("--strategy", choices=["exchange", "skip"], default=None,
                   help="Masked Gating for a missing expert: best resident instead (exchange) or drop it (skip)")
    p.add_argument("--update-interval", type=int, default=None, help="tokens between resident-set updates")
    p.add_argument("--swaps-per-update", type=int, default=None, help="most swaps per layer per update")
    p.add_argument("--decay", type=float, default=0.98, help="per-token decay of expert importance")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--expert-dtype", default=None, choices=list(FORMATS),
                   help="hold experts quantised (weight-only, group-wise; docs/quantization.md); the budget counts "
                        "their bytes, so it holds more of them; in eval/sweep for the swapmoe policies; overrides a "
                        "plan's expert_dtype (which may give one per MoE layer) (default: the model's dtype)")
    p.add_argument("--sync-swaps", action="store_true", help="copy experts synchronously (no overlap; for comparison)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode with eager forwards instead of one CUDA graph replay per token (CUDA only)")
    p.add_argument("--compile-step", action="store_true",
                   help="compile the decode step with inductor (on CUDA before capturing it: 1.9x faster decode on "
                        "an OLMoE-sized model at 50%%; on a CPU: fused C++, 2.2x on the reference model); the first "
                        "token waits for the compile (about 50 s at OLMoE size on the H200, cold cache)")
    p.add_argument("--moe-kernel", choices=list(MOE_KERNELS), default=DEFAULT_MOE_KERNEL,
                   help="expert compute of decode steps: swapmoe's fused Triton kernel where swapmoe computes the "
                        "layer on CUDA (auto, the default), transformers' kernels everywhere (transformers), or the "
                        "fused kernel in every MoE layer (triton)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights: only for trusted files")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped in the model directory")


def load_from_args(args: argparse.Namespace) -> Any:
    """``swapmoe.load`` from the shared model arguments (``--plan`` fills in what the flags leave open)."""
    from swapmoe.loader import load

    kw: dict[str, Any] = {name: getattr(args, name) for name in ("strategy", "update_interval", "swaps_per_update")
                          if getattr(args, name) is not None}
    try:
        return load(
            args.model, args.memory_budget, plan=args.plan, host_budget=args.host_budget, decay=args.decay,
            device=args.device,
            dtype=args.dtype, expert_dtype=args.expert_dtype, async_swaps=not args.sync_swaps,
            allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code, cuda_graph=not args.no_cuda_graph,
            moe_kernel=getattr(args, "moe_kernel", DEFAULT_MOE_KERNEL),
            compile_step=getattr(args, "compile_step", False), **kw,
        )
    except ValueError as e:  # bad numeric options from RuntimeConfig
        raise SwapMoEError(str(e)) from None


def load_tokenizer(model_path: Any, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.loader import default_model_path

    path = model_path if model_path is not None else default_model_path()
    # a wrong path is a missing model, not a missing tokenizer: say so (pickle is judged by the loader)
    check_checkpoint(path, allow_pickle=True)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise SwapMoEError(
            f"no usable tokenizer in {path} ({str(e).splitlines()[0][:120]}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into the model directory"
        ) from None


def require_causal_checkpoint(model_path: Any, what: str, trust_remote_code: bool = False) -> None:
    """Refuse an encoder-decoder checkpoint up front, from its config alone (no weights read)."""
    from transformers import AutoConfig

    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.families import require_causal_lm
    from swapmoe.loader import default_model_path

    ckpt = check_checkpoint(model_path if model_path is not None else default_model_path(), allow_pickle=True)
    try:
        config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
    except ValueError:
        return  # the loader explains an unreadable config
    require_causal_lm(config, what)


def format_rate(rate: float | None) -> str:
    """A hit rate for a table: "-" where nothing was measured (no lookups), never a made-up 1.000."""
    return "-" if rate is None else f"{rate:.3f}"


def stats_table(stats: dict[str, Any], title: str = "swapmoe") -> Table:
    """Per-layer and total counters as a rich table."""
    t = Table(title=title)
    for col in ("layer", "slots/experts", "resident bytes", "swaps", "bytes copied", "hit rate"):
        t.add_column(col, justify="right")
    for la in stats["layers"]:
        part = la["module"].split(".")[0]  # an encoder-decoder's MoE layers are numbered across both
        label = f"{la['layer']} ({part})" if part in ("encoder", "decoder") else str(la["layer"])
        t.add_row(label, f"{la['slots']}/{la['num_experts']}", format_bytes(la["resident_bytes"]),
                  str(la["swaps"]), format_bytes(la["bytes_copied"]), format_rate(la["hit_rate"]))
    tot = stats["total"]
    t.add_row("total", str(tot["slots"]), format_bytes(tot["resident_bytes"]), str(tot["swaps"]),
              format_bytes(tot["bytes_copied"]), format_rate(tot["hit_rate"]), style="bold")
    return t


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    from swapmoe.inspect import describe
    from swapmoe.loader import default_model_path

    info = describe(args.model if args.model else default_model_path(), trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
    console.print(f"[bold]{info.path}[/bold]: {info.model_type}, {info.dtype}, routing rule: {info.routing}")
    uniq = sorted(set(zip(info.num_experts, info.top_k, info.expert_bytes, strict=True)))
    for e, k, b in uniq:
        console.print(f"  {e} experts per MoE layer, top-{k}, {format_bytes(b)} per expert")
    console.print(f"  MoE layers: {len(info.moe_layers)} of {info.num_layers} layers")
    console.print(f"  all experts: {format_bytes(info.total_expert_bytes)}; other weights: {format_bytes(info.other_bytes)}"
                  " (always on the device, outside the budget, as is the KV cache)")
    console.print(f"  minimum budget (top-k experts per layer): {format_bytes(info.minimum_budget)} "
                  f"= {info.minimum_budget} bytes = {100 * info.minimum_budget / info.total_expert_bytes:.1f}%")
    # --expert-dtype: the same bytes hold more experts in fewer bits (bf16 shown where it is not the model's)
    formats = [f for f in info.expert_bytes_as if not (f == "bf16" and info.dtype == "bfloat16")]
    for f in formats:
        b = info.stored_bytes(f)
        how = f"as published ({f}, held so without --expert-dtype)" if f == info.published else f"--expert-dtype {f}"
        console.print(f"  {how}: {format_bytes(sum(b) / len(b))} per expert (scales included), "
                      f"all experts {format_bytes(info.total_bytes(f))}")
    t = Table(title="what a budget means (experts per MoE layer that fit)")
    for col in ("budget", "bytes", f"{info.dtype} experts", *(f"{f} experts" for f in formats)):
        t.add_column(col, justify="right")
    for frac in (0.125, 0.25, 0.5, 0.75, 1.0):
        cells = []
        for f in (None, *formats):
            if frac * info.total_expert_bytes < info.minimum_budget_as(f):
                cells.append("below minimum")
                continue
            cells.append("/".join(map(str, sorted(set(info.slots_for(frac, f))))))
        t.add_row(f"{frac:.1%}", format_bytes(int(frac * info.total_expert_bytes)), *cells)
    console.print(t)
    return 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    import torch
    from transformers import TextStreamer

    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_from_args(args)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    times: list[float] = []

    class _Timed(TextStreamer):
        def put(self, value: torch.Tensor) -> None:
            times.append(time.perf_counter())
            super().put(value)

    streamer = _Timed(tok, skip_prompt=True)
    gen_kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "streamer": streamer,
                              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        gen_kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        gen_kw.update(do_sample=False)
    # a decoder-only model continues the prompt; an encoder-decoder (Switch) answers it (text-to-text),
    # and its output starts from the decoder's start token instead of the prompt
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    sys.stdout.write(f"{args.prompt}\n-> " if seq2seq else args.prompt)
    sys.stdout.flush()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **gen_kw)
    end = time.perf_counter()
    sys.stdout.write("\n")
    new = out.shape[1] - (1 if seq2seq else ids.shape[1])
    # times[0] is the prompt, times[1] the first new token: decode rate excludes the prefill
    first = times[1] if len(times) > 1 else end
    decode_tps = (new - 1) / (end - first) if new > 1 and end > first else float("nan")
    console.print(stats_table(model.swapmoe.stats()))
    console.print(f"{new} new tokens in {end - start:.2f}s: prefill {ids.shape[1]} tokens {first - start:.3f}s, "
                  f"decode {decode_tps:.1f} tokens/s on {model.device}")
    return 0


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    import os
    from pathlib import Path

    from swapmoe.checkpoint import check_checkpoint
    from swapmoe.loader import default_model_path

    if args.max_queue < 0:
        raise SwapMoEError("--max-queue must be >= 0")
    if args.request_timeout < 0:
        raise SwapMoEError("--request-timeout must be >= 0 (0: no limit)")
    if args.header_timeout <= 0 or args.body_timeout <= 0:
        raise SwapMoEError("--header-timeout and --body-timeout must be > 0 (seconds)")
    if args.shutdown_grace < 0:
        raise SwapMoEError("--shutdown-grace must be >= 0 (seconds)")
    if args.warmup_tokens < 0:
        raise SwapMoEError("--warmup-tokens must be >= 0")
    if args.warmup_tokens and args.resident_set == "adaptive":
        raise SwapMoEError("--warmup-tokens counts tokens before the resident set is held: add --resident-set "
                           "fixed (or reset)")
    warmup_text = None
    if args.warmup_file is not None:
        try:
            warmup_text = Path(args.warmup_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SwapMoEError(f"cannot read --warmup-file {args.warmup_file}: {e}") from None
    api_key = args.api_key or os.environ.get("SWAPMOE_API_KEY") or None
    check_checkpoint(args.model or default_model_path(), allow_pickle=args.allow_pickle)  # before the tokenizer
    require_causal_checkpoint(args.model, "the OpenAI server", args.trust_remote_code)
    try:
        from swapmoe.server import ServerConfig, create_app, serve
    except ImportError as e:
        raise SwapMoEError(f"the server needs fastapi, uvicorn and pydantic ({e}); install swapmoe with its "
                           "dependencies (pip install -e .) on this machine") from None
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = load_from_args(args)
    name = args.served_model_name or Path(args.model or default_model_path()).expanduser().resolve().name
    config = ServerConfig(model_name=name, api_key=api_key, max_queue=args.max_queue,
                          time_limit=args.request_timeout or None, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout, shutdown_grace=args.shutdown_grace,
                          resident_set=args.resident_set, warmup_tokens=args.warmup_tokens,
                          warmup_text=warmup_text)
    console.print(stats_table(model.swapmoe.stats(), title=f"swapmoe serve: {name}"))
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] listening on {args.host} without --api-key: anyone who can "
                      "reach this address can use the model")
    console.print(f"OpenAI API at http://{args.host}:{args.port}/v1 (model {name!r}); metrics at /metrics")
    serve(create_app(model, tok, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="experts per layer, bytes per expert, what budgets mean")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or repo id (default: bundled model)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a repo id (default: main)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text within a memory budget, streaming it")
    _add_model_arguments(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: completions, chat, streaming, metrics")
    _add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (or set SWAPMOE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name for clients (default: directory name)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while one runs; more get 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may run on the engine; 0 = no limit")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's head (request line and headers) to arrive; then 408 and close")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's body to arrive once its head has; then 408 and close")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="on SIGTERM/Ctrl-C, seconds a running generation may go on before it is ended "
                        "(its stream gets a last chunk and [DONE]); waiting requests get 503 at once")
    p.add_argument("--resident-set", choices=["adaptive", "fixed", "reset"], default="adaptive",
                   help="adaptive: experts follow the text served (answers depend on earlier requests); "
                        "fixed: held after the warm-up, so the same request gives the same answer; "
                        "reset: adapts within each request, every request starting from the warm-up's state")
    p.add_argument("--warmup-file", default=None,
                   help="text run through the model at start-up, before serving (fits the resident set to it)")
    p.add_argument("--warmup-tokens", type=int, default=0,
                   help="with --resident-set fixed or reset: tokens served before the set is held (default 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    from swapmoe.evaluation.commands import add_parsers as add_evaluation_parsers

    add_evaluation_parsers(sub, _add_model_arguments)  # eval, sweep, trace
    from swapmoe.evaluation.eval_ppl import add_eval_ppl_parser

    add_eval_ppl_parser(sub, _add_model_arguments)  # eval-ppl
    from swapmoe.planner.commands import add_parsers as add_planner_parsers

    add_planner_parsers(sub, _add_model_arguments)  # profile, plan
    return parser


def resolve_model_argument(args: argparse.Namespace) -> None:
    """A model named by its Hugging Face repo id (org/name) becomes its local snapshot directory before
    the command runs (swapmoe.hub: the cache when offline), so every command sees a directory."""
    from swapmoe.hub import looks_like_repo_id, resolve_model

    model, revision = getattr(args, "model", None), getattr(args, "revision", None)
    if model is None:
        if revision is not None:
            raise SwapMoEError("--revision needs a model named by its repo id (org/name)")
        return
    if looks_like_repo_id(model) or revision is not None:
        if getattr(args, "served_model_name", "") is None and looks_like_repo_id(model):
            args.served_model_name = model  # clients name it as the user did, not by its snapshot hash
        args.model = str(resolve_model(model, revision, allow_pickle=getattr(args, "allow_pickle", False)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        resolve_model_argument(args)
        return int(args.func(args, console) or 0)
    except SwapMoEError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
