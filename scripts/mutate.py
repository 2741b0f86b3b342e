"""Mutation check: does the suite turn red when the core mechanism breaks?

Each mutation below is a one-line change that breaks the mechanism the way a plausible edit could
(drop a factor of Eq. 1, forget per token instead of per call, evict the wrong expert, send a skipped
term to a real slot...). The script copies the working tree (tracked and untracked, not ignored files)
to a temporary directory, applies one mutation at a time *to the copy*, runs only the test files that
cover the mutated code, and reports each mutation as

    killed    the tests failed, as they must
    survived  the tests passed: the mechanism can break without the suite noticing
    stale     the original snippet is no longer in the file (the code moved): update the list

The score is killed / (killed + survived). It exits non-zero if a mutation survived or is stale, or if
the unmutated copy does not pass its tests (nothing could be concluded then).

    python scripts/mutate.py                 # all mutations (make mutate)
    python scripts/mutate.py --list          # names only
    python scripts/mutate.py --only drop-expert-norm --only drop-token-decay
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORTANCE_TESTS = ("tests/test_importance.py",)
POLICY_TESTS = ("tests/test_policy.py",)
ROUTING_TESTS = ("tests/test_routing.py",)
DECODER_TESTS = ("tests/engine/test_decoder.py", "tests/test_long_call.py")
MEMORY_TESTS = ("tests/test_loader.py", "-k", "memory_held and mixtral")
QUANT_TESTS = ("tests/test_quant.py",)
PRECISION_TESTS = ("tests/planner/test_precision.py",)
MXFP4_TESTS = ("tests/test_mxfp4.py",)
ADAPTED_QUANT_TESTS = ("tests/adapters/test_adapted_quantised.py",)
QEXPERTS_TESTS = ("tests/test_qexperts.py",)
FUSED_TESTS = ("tests/test_fused_moe.py", "-k", "compiled or opaque")


@dataclass(frozen=True)
class Mutation:
    """Replace ``original`` (must occur exactly once in ``file``) by ``replacement``; run ``tests``."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    # ---- the three of issue 12, which once left the whole suite green
    Mutation("drop-expert-norm", "src/swapmoe/importance.py",
             "    return inc * norms\n", "    return inc\n", IMPORTANCE_TESTS),
    Mutation("drop-token-decay", "src/swapmoe/importance.py",
             "importance.mul_(decay**tokens)", "importance.mul_(decay)", IMPORTANCE_TESTS),
    # the owed swaps of a long call (runtime/scheduler.py)
    Mutation("drop-owed-swaps", "src/swapmoe/runtime/scheduler.py",
             "config.swaps_per_update * due", "config.swaps_per_update",
             ("tests/test_long_call.py",)),
    Mutation("update-one-interval-late", "src/swapmoe/runtime/scheduler.py",
             "st.tokens_since_update < config.update_interval",
             "st.tokens_since_update <= config.update_interval", ("tests/test_long_call.py",)),
    # ---- the graph path's split: host side before each replay, in-graph work only inside it
    Mutation("static-step-skips-scheduler", "src/swapmoe/engine/decoder.py",
             "        self.runtime.before_replay(1)\n        with self.runtime.capturing(), self._fused_router():",
             "        with self.runtime.capturing(), self._fused_router():", DECODER_TESTS),
    Mutation("captured-hooks-still-schedule", "src/swapmoe/runtime/__init__.py",
             "        if not self.in_graph:", "        if True:", DECODER_TESTS),
    Mutation("staged-swap-maps-before-its-read", "src/swapmoe/pool.py",
             "                if not (wait or p.staged.done()):", "                if False:",
             ("tests/test_mmap_store.py", "-k", "reader")),
    Mutation("unmap-leaves-expert-resident", "src/swapmoe/pool.py",
             "            self.resident[old].fill_(False)", "            self.resident[old].fill_(True)",
             DECODER_TESTS),
    # ---- the budget, measured from storages (tests/memory.py); pool.py moves with the runtime rewrite
    Mutation("swap-reallocates-slots", "src/swapmoe/pool.py",
             "                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=False)\n",
             "                pool.slots = {n: t.clone() for n, t in pool.slots.items()}\n"
             "                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=False)\n",
             MEMORY_TESTS),
    Mutation("swap-keeps-a-copy", "src/swapmoe/pool.py",
             "                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=False)\n",
             "                copied += pool.store.copy_into(pool.views(sw.slot), sw.new, non_blocking=False)\n"
             "                pool.evicted = {n: t.clone() for n, t in pool.views(sw.slot).items()}\n",
             MEMORY_TESTS),
    # ---- Eq. 1 and its accumulation
    Mutation("drop-token-norm", "src/swapmoe/importance.py",
             "contrib = x_norm.unsqueeze(-1) * weights.detach().float()",
             "contrib = weights.detach().float()", IMPORTANCE_TESTS),
    Mutation("drop-gate", "src/swapmoe/importance.py",
             "contrib = x_norm.unsqueeze(-1) * weights.detach().float()",
             "contrib = x_norm.unsqueeze(-1) * torch.ones_like(weights, dtype=torch.float32)", IMPORTANCE_TESTS),
    Mutation("squared-expert-norm", "src/swapmoe/importance.py",
             "torch.stack(squares).sum(dim=0).sqrt()", "torch.stack(squares).sum(dim=0)", IMPORTANCE_TESTS),
    Mutation("overwrite-not-accumulate", "src/swapmoe/importance.py",
             "importance.add_(increment)", "importance.copy_(increment)", IMPORTANCE_TESTS),
    # ---- the swap policy
    Mutation("target-least-important", "src/swapmoe/policy.py",
             "key=lambda e: (-importance[e], e)", "key=lambda e: (importance[e], e)", POLICY_TESTS),
    Mutation("evict-most-important", "src/swapmoe/policy.py",
             "key=lambda s: (importance[expert_in[s]], -expert_in[s])",
             "key=lambda s: (-importance[expert_in[s]], -expert_in[s])", POLICY_TESTS),
    Mutation("swap-on-ties", "src/swapmoe/policy.py",
             "if importance[new] <= importance[old] * (1.0 + min_gain):",
             "if importance[new] < importance[old] * (1.0 + min_gain):", POLICY_TESTS),
    Mutation("absolute-min-gain", "src/swapmoe/policy.py",
             "if importance[new] <= importance[old] * (1.0 + min_gain):",
             "if importance[new] <= importance[old] + min_gain:", POLICY_TESTS),
    Mutation("ignore-empty-slots", "src/swapmoe/policy.py",
             "empty = [s for s, e in enumerate(expert_in) if e < 0]", "empty = []", POLICY_TESTS),
    Mutation("one-swap-too-many", "src/swapmoe/policy.py",
             "if len(swaps) >= max_swaps:", "if len(swaps) > max_swaps:", POLICY_TESTS),
    # ---- Masked Gating
    Mutation("exchange-ignores-mask", "src/swapmoe/routing.py",
             "choice = probs.masked_fill(~mask, NEG_INF)  # [T, E]", "choice = probs  # [T, E]", ROUTING_TESTS),
    Mutation("resoftmax-over-residents", "src/swapmoe/routing.py",
             "    w = probs.gather(-1, idx)  # [T, K]\n",
             "    w = F.softmax(choice, dim=-1).gather(-1, idx)  # [T, K]\n", ROUTING_TESTS),
    Mutation("never-renormalise", "src/swapmoe/routing.py",
             "    if p.norm_topk_prob:\n        w /= w.sum(dim=-1, keepdim=True)\n",
             "    if False:\n        w /= w.sum(dim=-1, keepdim=True)\n", ROUTING_TESTS),
    Mutation("skip-keeps-weight", "src/swapmoe/routing.py",
             "return weights.masked_fill(~mask[indices], 0), indices", "return weights, indices", ROUTING_TESTS),
    Mutation("sentinel-is-slot-0", "src/swapmoe/routing.py",
             "slots.masked_fill(missing, num_slots if sentinel is None else sentinel)",
             "slots.masked_fill(missing, 0)", ROUTING_TESTS),
    Mutation("sentinel-keeps-weight", "src/swapmoe/routing.py",
             "return weights.masked_fill(missing, 0), slots", "return weights, slots", ROUTING_TESTS),
    Mutation("hit-if-any-resident", "src/swapmoe/routing.py",
             "hit = mask[indices].all(dim=-1, keepdim=True)", "hit = mask[indices].any(dim=-1, keepdim=True)",
             ROUTING_TESTS),
    Mutation("reroute-hit-tokens", "src/swapmoe/routing.py",
             "hit = mask[indices].all(dim=-1, keepdim=True)",
             "hit = torch.zeros_like(indices[:, :1], dtype=torch.bool)", ROUTING_TESTS),
    Mutation("substitute-same-resident-twice", "src/swapmoe/routing.py",
             "rank = (missing.long().cumsum(dim=-1) - 1).clamp(min=0)  # [T, K] j-th missing -> j",
             "rank = torch.zeros_like(missing, dtype=torch.long)", ROUTING_TESTS),
    Mutation("short-group-not-filled", "src/swapmoe/routing.py",
             "return torch.where(short, outside.gather(1, rank), idx)", "return idx", ROUTING_TESTS),
    Mutation("drop-routed-scaling", "src/swapmoe/routing.py",
             "        w /= w.sum(dim=-1, keepdim=True) + 1e-20\n    return w * p.scaling, idx\n",
             "        w /= w.sum(dim=-1, keepdim=True) + 1e-20\n    return w, idx\n", ROUTING_TESTS),
    # ---- quantised experts, the planner's precision axis, published MXFP4, the graph path's guard
    Mutation("int3-word-bytes-reversed", "src/swapmoe/quant.py",
             "word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16)",
             "word = u[..., 2] | (u[..., 1] << 8) | (u[..., 0] << 16)", QUANT_TESTS),
    Mutation("planner-ignores-format-penalty", "src/swapmoe/planner/perfmodel.py",
             "q = 0.0 if fmt is None else self.format_points[layer][fmt]", "q = 0.0", PRECISION_TESTS),
    Mutation("mxfp4-nibbles-swapped", "src/swapmoe/mxfp4.py",
             "(_e2m1_values(b & 15), _e2m1_values(b >> 4))", "(_e2m1_values(b >> 4), _e2m1_values(b & 15))",
             MXFP4_TESTS),
    Mutation("graph-despite-host-scalar-mask", "src/swapmoe/engine/decoder.py",
             'if getattr(model.config, "_attn_implementation", None) == "eager" and not eager_mask_is_capturable():',
             "if False:", DECODER_TESTS),
    Mutation("quantised-scratch-misnumbered", "src/swapmoe/qexperts.py",
             "lut[used] = torch.arange(c, device=ids.device)",
             "lut[used] = torch.arange(c, device=ids.device).flip(0)", ADAPTED_QUANT_TESTS),
    Mutation("prefill-chunks-keep-the-last-only", "src/swapmoe/qexperts.py",
             "kept = out if kept is None else torch.where(inside, out, kept)", "kept = out", QEXPERTS_TESTS),
    Mutation("hqq-zero-step-sign-flipped", "src/swapmoe/quant.py",
             "        torch.sub(q, t, out=t)  # q - (x - e) / s", "        torch.sub(t, q, out=t)", QUANT_TESTS),
    Mutation("device-quantise-last-chunk-dropped", "src/swapmoe/quant.py",
             "for i in range(0, rows.shape[0], step):", "for i in range(0, rows.shape[0] - step, step):",
             QUANT_TESTS),
    Mutation("swap-copies-no-scales", "src/swapmoe/pool.py",
             "        dst.copy_(src, non_blocking=non_blocking)\n",
             "        if not name.endswith(\".scale\"):\n            dst.copy_(src, non_blocking=non_blocking)\n",
             ADAPTED_QUANT_TESTS),
    # ---- the fused kernel under torch.compile, and a router step whose compile fails
    Mutation("fused-call-count-read-while-tracing", "src/swapmoe/fused.py",
             "        if not torch.compiler.is_compiling():", "        if True:", FUSED_TESTS),
    Mutation("fused-kernel-traced-not-opaque", "src/swapmoe/kernels/fused_op.py",
             "    return torch.ops.swapmoe.fused_experts(\n        hidden,",
             "    return fused_experts._init_fn(\n        hidden,", FUSED_TESTS),
    Mutation("router-compile-failure-propagates", "src/swapmoe/runtime/__init__.py",
             "            except torch._dynamo.exc.TorchDynamoException as e:",
             "            except ZeroDivisionError as e:", DECODER_TESTS),
    Mutation("compiled-server-not-primed", "src/swapmoe/server/app.py",
             "lambda _ctx: prime_compiled_step(server.model)", "lambda _ctx: None",
             ("tests/server/test_compiled_step.py",)),
    Mutation("group-mask-after-selection", "src/swapmoe/routing.py",
             "    choice = choice.masked_fill(~mask, NEG_INF)\n    if p.num_group > 1:\n"
             "        idx = _topk_in_groups(choice, _group_select(choice, p, \"top2sum\"), p.top_k)",
             "    if p.num_group > 1:\n"
             "        idx = _topk_in_groups(choice.masked_fill(~mask, NEG_INF), _group_select(choice, p, \"top2sum\"),"
             " p.top_k)", ROUTING_TESTS),
)


@dataclass
class Outcome:
    name: str
    file: str
    status: str  # killed | survived | stale
    seconds: float
    detail: str = ""


def tree_files(root: Path) -> list[str]:
    """Tracked and untracked files that git does not ignore: the working tree as it is, edits included."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for rel in tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest on ``tests`` inside the copy, its own ``src`` first on the path; (return code, last line)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy / "src"), str(copy)])}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f}s"
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines[-1] if lines else ""


def check_imports_copy(copy: Path) -> None:
    """The tests must import swapmoe from the copy, not from an installed checkout elsewhere."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    where = subprocess.run([sys.executable, "-c", "import swapmoe; print(swapmoe.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutate: swapmoe imports from {where}, not from the copy {copy}; nothing would be tested")


def mutate_one(copy: Path, m: Mutation, timeout: float) -> Outcome:
    path = copy / m.file
    start = time.perf_counter()
    text = path.read_text() if path.is_file() else ""
    count = text.count(m.original)
    if count != 1:
        why = "file gone" if not path.is_file() else f"original snippet found {count} times"
        return Outcome(m.name, m.file, "stale", 0.0, why)
    path.write_text(text.replace(m.original, m.replacement))
    try:
        rc, last = run_tests(copy, m.tests, timeout)
    finally:
        path.write_text(text)
    status = "survived" if rc == 0 else "killed"
    return Outcome(m.name, m.file, status, time.perf_counter() - start, last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutations")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    ap.add_argument("--json", type=Path, help="also write the outcomes to this file")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"mutate: no mutation named {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.file:28s} {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="swapmoe-mutate-") as tmp:
        copy = Path(tmp)
        copy_tree(ROOT, copy)
        check_imports_copy(copy)
        for tests in dict.fromkeys(m.tests for m in chosen):  # each distinct selection once, in order
            rc, last = run_tests(copy, tests, args.timeout)
            if rc != 0:
                print(f"mutate: the unmutated tree fails {' '.join(tests)} ({last}); fix that first", file=sys.stderr)
                return 2
            print(f"baseline  {' '.join(tests)}: {last}")
        outcomes = []
        for m in chosen:
            o = mutate_one(copy, m, args.timeout)
            outcomes.append(o)
            print(f"{o.status:9s} {o.name:32s} {o.file:28s} {o.seconds:6.1f}s  {o.detail}", flush=True)

    killed = sum(o.status == "killed" for o in outcomes)
    survived = [o.name for o in outcomes if o.status == "survived"]
    stale = [o.name for o in outcomes if o.status == "stale"]
    scored = killed + len(survived)
    score = killed / scored if scored else float("nan")
    print(f"mutation score: {killed}/{scored} killed ({score:.0%})"
          + (f"; survived: {', '.join(survived)}" if survived else "")
          + (f"; stale (snippet not found, not scored): {', '.join(stale)}" if stale else ""))
    if args.json:
        from swapmoe.provenance import provenance

        args.json.write_text(json.dumps({"provenance": provenance(), "score": score, "killed": killed,
                                         "scored": scored, "outcomes": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    return 0 if not survived and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
