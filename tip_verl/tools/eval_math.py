"""mean@n evaluation of a (student) model on math parquet files (paper App. B.3: mean@16, temperature 1.0).

For every problem of every dataset, ``n`` responses are sampled; each is scored correct (1) or not (0)
by verl's own math scorer, :func:`verl.utils.reward_score.default_compute_score`, which picks the
checker from the row's ``data_source`` (``math_reward``: last ``\\boxed{}`` with MATH string
normalisation for MATH-500; ``math_dapo``: "Answer:" line or last ``\\boxed{}`` for DAPO and AIME).
A sample counts as correct when the scorer's ``acc`` (or, without it, its ``score``) is > 0.

Reported per dataset: ``mean`` = mean@n (accuracy over all problems and samples), ``std`` = the
standard deviation (population, ddof=0) over the n per-sample-index accuracies (run k = the k-th
response of every problem), ``per_sample_mean`` (those n accuracies) and ``best_at_n`` (share of
problems with at least one correct response). Output: ``results.json``, ``results.md`` and one
``<dataset>_samples.jsonl`` per dataset (responses and scores of every problem).

The data files are the ones :mod:`tip_verl.tools.math_data` writes (verl layout: ``prompt`` chat
messages, ``reward_model.ground_truth``, ``data_source``). To evaluate a verl checkpoint, merge it
to Hugging Face format first::

    python -m verl.model_merger merge --backend fsdp \\
        --local_dir checkpoints/<project>/<experiment>/global_step_<N>/actor --target_dir merged/

Usage::

    python -m tip_verl.tools.eval_math --model merged/ --data data/math/math500.parquet \\
        data/math/aime24.parquet data/math/aime25.parquet --n 16 --temperature 1.0 \\
        --backend vllm --max-new-tokens 8192 --out eval/

Backends: ``vllm`` (GPU; ``--tp`` for tensor parallelism) and ``hf`` (``transformers`` generate;
works on CPU, slow for real models). ``--score-fn tiny_addition`` scores with the tiny addition
task's rule (``tip_verl/assets/reward.py``); ``--score-fn path/to/file.py:function`` with any
function ``f(data_source, solution_str, ground_truth, extra_info=None)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_problems", "main", "resolve_score_fn", "score_binary", "summarize", "evaluate"]

ScoreFn = Callable[..., Any]


# ------------------------------------------------------------------------------------------ data
def _plain(value: Any) -> Any:
    """numpy arrays / scalars from parquet -> plain Python (lists, dicts, str, numbers)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def load_problems(path: str | os.PathLike, max_problems: int | None = None) -> list[dict]:
    """Rows of a verl math parquet as ``{"messages", "ground_truth", "data_source", "extra_info"}``."""
    import pandas as pd

    frame = pd.read_parquet(path)
    for col in ("prompt", "reward_model"):
        if col not in frame.columns:
            raise ValueError(f"{path}: missing column {col!r} (columns found: {list(frame.columns)}); "
                             "prepare the data with `python -m tip_verl.tools.math_data`")
    problems = []
    for i, row in enumerate(frame.to_dict("records")):
        if max_problems is not None and i >= max_problems:
            break
        messages = _plain(row["prompt"])
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        reward_model = _plain(row["reward_model"]) or {}
        gt = reward_model.get("ground_truth")
        if gt is None:
            raise ValueError(f"{path}: row {i} has no reward_model.ground_truth")
        problems.append({
            "messages": messages,
            "ground_truth": gt,
            "data_source": str(row.get("data_source", "math")),
            "extra_info": _plain(row.get("extra_info")) or {},
        })
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


# --------------------------------------------------------------------------------------- scoring
def _load_file_function(spec: str) -> ScoreFn:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--score-fn {spec!r}: expected 'path/to/file.py:function'")
    if not os.path.isfile(path):
        raise ValueError(f"--score-fn {spec!r}: {path} is not a file")
    module_spec = importlib.util.spec_from_file_location(f"_tip_eval_score_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--score-fn {spec!r}: {path} has no function {name!r}")
    return fn


def resolve_score_fn(spec: str | None) -> tuple[ScoreFn, str]:
    """``None``/``"verl"`` -> verl's ``default_compute_score``; ``"tiny_addition"``; or ``file.py:function``."""
    if spec in (None, "", "verl"):
        from verl.utils.reward_score import default_compute_score

        return default_compute_score, "verl.utils.reward_score.default_compute_score"
    if spec == "tiny_addition":
        import tip_verl

        path = Path(tip_verl.__file__).resolve().parent / "assets" / "reward.py"
        spec = f"{path}:compute_score"
    return _load_file_function(spec), spec


def score_binary(result: Any) -> float:
    """A scorer's result as 1.0 (correct) or 0.0: ``acc`` (else ``score``) of a dict, or the number, > 0."""
    if isinstance(result, Mapping):
        result = result["acc"] if "acc" in result else result.get("score", 0.0)
    try:
        value = float(result)
    except (TypeError, ValueError):
        return 0.0
    return 1.0 if value > 0 else 0.0


# ------------------------------------------------------------------------------------ generation
def _prompt_ids(tokenizer, messages: list[dict], chat_template_kwargs: Mapping[str, Any]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **chat_template_kwargs)
    # The chat template already holds any BOS token: do not let the tokenizer add another.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class HFGenerator:
    """Sampling with ``transformers`` ``generate`` (CPU or one GPU)."""

    def __init__(self, model_path: str, *, device: str | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.batch_size = max(1, int(batch_size))

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[str]]:
        import torch

        torch.manual_seed(seed)
        tok = self.tokenizer
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        results: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):  # left padding
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            # Plain temperature / top-p sampling, as in verl's rollout and vLLM: switch off the top-k and
            # repetition penalty a checkpoint's generation_config.json may set.
            # Greedy decoding (temperature 0) gives one response, repeated n times.
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
                if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            sampling["repetition_penalty"] = 1.0
            n_gen = n if temperature > 0 else 1
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                    max_new_tokens=max_new_tokens, num_return_sequences=n_gen, pad_token_id=tok.pad_token_id,
                    eos_token_id=eos, **sampling)
            new_tokens = out[:, width:].cpu()
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
            for row in range(len(chunk)):
                got = texts[row * n_gen:(row + 1) * n_gen]
                results.append(got if n_gen == n else got * n)
        return results


class VLLMGenerator:
    """Sampling with vLLM (GPU)."""

    def __init__(self, model_path: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, trust_remote_code: bool = False, seed: int = 0,
                 dtype: str = "auto"):
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("--backend vllm needs vLLM (`pip install vllm`, GPU only); "
                               "use --backend hf otherwise") from e
        kwargs = {"model": model_path, "tensor_parallel_size": tensor_parallel_size,
                  "gpu_memory_utilization": gpu_memory_utilization, "trust_remote_code": trust_remote_code,
                  "seed": seed, "dtype": dtype}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        n_gen = n if temperature > 0 else 1  # greedy: one response, repeated n times
        params = SamplingParams(n=n_gen, temperature=max(temperature, 0.0), top_p=top_p if temperature > 0 else 1.0,
                                top_k=-1, max_tokens=max_new_tokens, seed=seed, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
        texts = [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
        return texts if n_gen == n else [t * n for t in texts]


# ------------------------------------------------------------------------------------ evaluation
def summarize(scores: Sequence[Sequence[float]]) -> dict:
    """mean@n, std over the n sample indices, per-sample-index accuracies and best@n of a problems x n grid."""
    if not scores or not scores[0]:
        raise ValueError("no scores")
    n = len(scores[0])
    if any(len(row) != n for row in scores):
        raise ValueError("every problem needs the same number of samples")
    per_sample = [sum(row[k] for row in scores) / len(scores) for k in range(n)]
    mean = sum(per_sample) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in per_sample) / n)
    best = sum(1.0 for row in scores if max(row) > 0) / len(scores)
    return {"mean": mean, "std": std, "per_sample_mean": per_sample, "best_at_n": best,
            "num_problems": len(scores), "n": n}


def _dataset_names(paths: Sequence[str]) -> list[str]:
    names, used = [], {}
    for p in paths:
        base = Path(p).stem
        used[base] = used.get(base, 0) + 1
        names.append(base if used[base] == 1 else f"{base}_{used[base]}")
    return names


def evaluate(generator, data: Sequence[str], *, out_dir: str | os.PathLike, n: int = 16,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 8192, seed: int = 0,
             score_fn: ScoreFn | None = None, score_fn_name: str = "", max_problems: int | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """Sample, score and write ``results.json`` / ``results.md`` / ``<dataset>_samples.jsonl``; return the results."""
    if n < 1:
        raise ValueError("--n must be >= 1")
    if score_fn is None:
        score_fn, score_fn_name = resolve_score_fn(None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        **(meta or {}), "n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "seed": seed, "score_fn": score_fn_name, "datasets": {},
    }
    for name, path in zip(_dataset_names(data), data):
        problems = load_problems(path, max_problems)
        prompts = [_prompt_ids(generator.tokenizer, p["messages"], chat_template_kwargs or {}) for p in problems]
        responses = generator.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=seed)
        grid = []
        samples_file = out / f"{name}_samples.jsonl"
        with samples_file.open("w", encoding="utf-8") as fh:
            for i, (prob, resp) in enumerate(zip(problems, responses)):
                raw = [score_fn(prob["data_source"], r, prob["ground_truth"], prob["extra_info"]) for r in resp]
                scores = [score_binary(s) for s in raw]
                grid.append(scores)
                fh.write(json.dumps({
                    "index": prob["extra_info"].get("index", i), "data_source": prob["data_source"],
                    "ground_truth": prob["ground_truth"], "responses": resp, "scores": scores,
                }, ensure_ascii=False) + "\n")
        summary = summarize(grid)
        summary.update({"file": str(path), "samples_file": samples_file.name})
        results["datasets"][name] = summary
        print(f"{name}: mean@{n} = {100 * summary['mean']:.1f} ± {100 * summary['std']:.1f} "
              f"(best@{n} {100 * summary['best_at_n']:.1f}, {summary['num_problems']} problems)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "results.md").write_text(_markdown(results), encoding="utf-8")
    return results


def _markdown(results: Mapping[str, Any]) -> str:
    n = results["n"]
    lines = [
        f"Model: `{results.get('model', '?')}` (backend {results.get('backend', '?')}), "
        f"n={n}, temperature={results['temperature']}, top_p={results['top_p']}, "
        f"max_new_tokens={results['max_new_tokens']}, scorer `{results['score_fn']}`",
        "",
        f"| dataset | problems | mean@{n} (%) | std (%) | best@{n} (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in results["datasets"].items():
        lines.append(f"| {name} | {s['num_problems']} | {100 * s['mean']:.1f} | {100 * s['std']:.1f} | "
                     f"{100 * s['best_at_n']:.1f} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tip_verl.tools.eval_math",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="mean@n accuracy (default mean@16 at temperature 1.0, as in the TIP paper) of a model on "
                    "verl math parquet files (from `python -m tip_verl.tools.math_data`), scored by verl's "
                    "math checker (verl.utils.reward_score.default_compute_score).",
        epilog="Writes OUT/results.json, OUT/results.md and OUT/<dataset>_samples.jsonl. To evaluate a verl "
               "checkpoint, merge it first: python -m verl.model_merger merge --backend fsdp "
               "--local_dir <ckpt>/global_step_N/actor --target_dir <hf_dir>",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder (or hub id)")
    parser.add_argument("--data", required=True, nargs="+", metavar="PARQUET", help="dataset parquet file(s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="response length limit (default 8192)")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                        help="vllm (GPU) or hf (transformers generate, also on CPU); default vllm")
    parser.add_argument("--score-fn", default=None, metavar="SPEC",
                        help="scorer: 'verl' (default, verl's math checker), 'tiny_addition', or path/to/file.py:function")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-problems", type=int, default=None, help="only the first N problems of each file")
    parser.add_argument("--chat-template-kwargs", default="{}", metavar="JSON",
                        help='extra chat-template arguments, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    hf = parser.add_argument_group("hf backend")
    hf.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (each sampled n times)")
    hf.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    vl = parser.add_argument_group("vllm backend")
    vl.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    vl.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    vl.add_argument("--max-model-len", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for path in args.data:
        if not os.path.isfile(path):
            parser.error(f"--data {path}: no such file")
    if args.n < 1:
        parser.error("--n must be >= 1")
    try:
        chat_kwargs = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as e:
        parser.error(f"--chat-template-kwargs is not JSON: {e}")
    if not isinstance(chat_kwargs, dict):
        parser.error("--chat-template-kwargs must be a JSON object")
    try:
        score_fn, score_name = resolve_score_fn(args.score_fn)
    except ValueError as e:
        parser.error(str(e))
    if args.backend == "hf":
        generator = HFGenerator(args.model, device=args.device, dtype=args.dtype,
                                trust_remote_code=args.trust_remote_code, batch_size=args.batch_size)
    else:
        generator = VLLMGenerator(args.model, tensor_parallel_size=args.tp,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
                                  seed=args.seed, dtype=args.dtype)
    results = evaluate(generator, args.data, out_dir=args.out, n=args.n, temperature=args.temperature,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, score_fn=score_fn,
                       score_fn_name=score_name, max_problems=args.max_problems, chat_template_kwargs=chat_kwargs,
                       meta={"model": args.model, "backend": args.backend})
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    return 0 if results["datasets"] else 1


if __name__ == "__main__":
    sys.exit(main())
