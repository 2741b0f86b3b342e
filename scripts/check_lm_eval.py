"""Check the lm-evaluation-harness example of docs/server.md end to end, without a model hub.

Reads the `lm_eval ... --model local-completions` command from docs/server.md, starts `swapmoe serve`
(the bundled model, -m 50%) on a free loopback port, and runs that command's --model_args (its
base_url pointed at this server) on three small local tasks written to a temporary folder from
data/heldout: multiple choice (loglikelihood), generation (generate_until) and rolling
loglikelihood over documents longer than the context (1,024 tokens), the case that needs
`max_length`. It fails (exit 1) if lm-eval fails or a metric is missing or not finite.

    pip install lm-eval==0.4.13          # once; it downloads nothing at run time here
    python scripts/check_lm_eval.py      # about a minute on 2 CPU cores

Hub access is switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): datasets are local JSON files,
the tokenizer is the bundled one. Only 127.0.0.1 is contacted; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serving import free_port, start_serve

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "swapmoe_mc": """task: swapmoe_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: mc.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "swapmoe_gen": """task: swapmoe_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: gen.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "swapmoe_rolling": """task: swapmoe_rolling
dataset_path: json
dataset_kwargs:
  data_files: {test: rolling.jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


def docs_command() -> list[str]:
    """The lm_eval command line of docs/server.md, as arguments."""
    text = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    match = re.search(r"^lm_eval .*?(?<!\\)$", text, flags=re.M | re.S)
    if match is None:
        raise SystemExit("docs/server.md has no `lm_eval ...` command")
    return shlex.split(match.group(0).replace("\\\n", " "))


def model_args(command: list[str], port: int) -> str:
    args = dict(kv.split("=", 1) for kv in command[command.index("--model_args") + 1].split(","))
    args["base_url"] = re.sub(r"//[^/]+/", f"//127.0.0.1:{port}/", args["base_url"])
    args["tokenizer"] = str(ROOT / args["tokenizer"]) if not Path(args["tokenizer"]).is_absolute() else args["tokenizer"]
    return ",".join(f"{k}={v}" for k, v in args.items())


def write_tasks(folder: Path) -> None:
    """Three tasks over the held-out texts: long contexts on purpose (beyond 1,024 tokens)."""
    paragraphs = [p.strip() for p in (ROOT / "data" / "heldout" / "all.txt").read_text(encoding="utf-8").split("\n")
                  if len(p.strip()) > 200]
    mc, gen = [], []
    for i, p in enumerate(paragraphs[:12]):
        cut = p.rfind(" ", 0, len(p) // 2)
        others = [paragraphs[(i + k) % len(paragraphs)] for k in (5, 9, 13)]
        choices = [p[cut:cut + 60]] + [o[len(o) // 2: len(o) // 2 + 60] for o in others]
        # every third item carries a context longer than the model's context: lm-eval must truncate it
        context = (" ".join(paragraphs[20:60]) + " " if i % 3 == 0 else "") + p[:cut]
        mc.append({"context": context, "choices": choices, "answer": 0})
        gen.append({"context": p[:cut], "target": p[cut:cut + 40]})
    long_docs = [" ".join(paragraphs[k:k + 30]) for k in (0, 30)]  # thousands of tokens each
    for name, rows in (("mc", mc), ("gen", gen), ("rolling", [{"text": t} for t in long_docs])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, yaml in TASKS.items():
        (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-eval", default=shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval"),
                   help="the lm_eval executable")
    p.add_argument("--keep", default=None, help="keep the tasks and results in this folder")
    args = p.parse_args()
    if not Path(args.lm_eval).exists():
        print("lm_eval not found: pip install lm-eval==0.4.13", file=sys.stderr)
        return 1
    command = docs_command()
    name = dict(kv.split("=", 1) for kv in command[command.index("--model_args") + 1].split(","))["model"]
    port = free_port()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="lm-eval-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    write_tasks(folder)
    proc = start_serve(["-m", "50%", "--served-model-name", name], port, quiet=False)
    try:
        run = [args.lm_eval, "run", "--model", "local-completions", "--model_args", model_args(command, port),
               "--tasks", ",".join(TASKS), "--include_path", str(folder), "--output_path", str(folder / "out")]
        print("$", shlex.join(run), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(run, cwd=folder, env=env, timeout=1800)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    if done.returncode != 0:
        print(f"lm_eval failed with exit code {done.returncode}", file=sys.stderr)
        return 1
    results = json.loads(next((folder / "out").rglob("results_*.json")).read_text())["results"]
    expected = {"swapmoe_mc": ["acc,none"], "swapmoe_gen": ["exact_match,none"],
                "swapmoe_rolling": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"]}
    problems = [f"{task} {metric}" for task, metrics in expected.items() for metric in metrics
                if not isinstance(results.get(task, {}).get(metric), int | float)
                or not math.isfinite(results[task][metric])]
    for task, metrics in expected.items():
        print(task, {m: results.get(task, {}).get(m) for m in metrics})
    if problems:
        print("missing or not finite: " + ", ".join(problems), file=sys.stderr)
        return 1
    print("lm-eval example of docs/server.md: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
