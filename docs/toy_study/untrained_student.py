#!/usr/bin/env python
"""The untrained student on the toy task: response lengths and where its tokens sit in the (h, δ) plane.

Samples ``--n`` responses per test prompt from the assets' student at temperature 1 (plain Hugging Face,
no verl), scores every response token with the exact signals of tip_verl's core (normalised entropy h,
Eq. 2; reverse KL δ to the teacher, Eq. 3) and reports: the distribution of response lengths, the share
of tokens per quadrant (the plugin's default median split, as in the ``tip/q*_share`` metrics), and h and
δ per token role of the worked solution (format, copied digit, column sum, answer). Writes JSON next to
``--out`` and prints a Markdown summary.

    .venv/bin/python docs/toy_study/untrained_student.py --out docs/toy_study/untrained_student.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter

import torch

from tip_verl.assets import build_assets
from tip_verl.assets import models as M
from tip_verl.assets.task import solution
from tip_verl.signals import full_logits_divergences
from tip_verl.taxonomy import classify_quadrants, quadrant_stats


def token_roles(tok, a: int, b: int) -> list[str]:
    """Role of each token of the reference worked solution (+ eos): format, copy, sum, answer."""
    roles = []
    for line_no, line in enumerate(solution(a, b).split("\n")):
        last = "=" not in line
        for pos, ch in enumerate(line):
            if last:
                roles.append("answer")
            elif ch in "+=":
                roles.append("format")
            else:
                roles.append("copy" if pos in (0, 2, 4) else "sum")  # digit of a, digit of b, carry; then the sum
        roles.append("format")  # the line break, or eos after the answer
    return roles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4, help="samples per test prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/toy_study/untrained_student.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import pandas as pd

    paths = build_assets(quiet=True)
    tok = AutoTokenizer.from_pretrained(str(paths.student))
    student = AutoModelForCausalLM.from_pretrained(str(paths.student), dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(paths.teacher), dtype=torch.float32).eval()
    test = pd.read_parquet(paths.test_parquet)
    pairs = [(int(e["a"]), int(e["b"])) for e in test["extra_info"]] * a.n
    responses = M.generate_answers(student, tok, pairs, do_sample=True, seed=a.seed)

    lengths, rows = [], []
    for (x, y), text in zip(pairs, responses):
        prompt = M.encode_prompt(tok, x, y)
        resp = tok.encode(text, add_special_tokens=False)
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            s_logits = student(ids).logits[0, len(prompt) - 1 : -1].float()
            t_logits = teacher(ids).logits[0, len(prompt) - 1 : -1].float()
        rkl, _, ent = full_logits_divergences(s_logits, t_logits)
        reference = M.encode_response(tok, x, y)
        roles = token_roles(tok, x, y)
        on_track = True
        for i, t in enumerate(resp):
            role = roles[i] if on_track and i < len(roles) else "after a mistake"
            rows.append((role, float(ent[i]) / math.log(len(tok)), float(rkl[i])))
            on_track = on_track and i < len(reference) and t == reference[i]
        lengths.append(len(resp))

    h = torch.tensor([[r[1] for r in rows]])
    d = torch.tensor([[r[2] for r in rows]])
    mask = torch.ones_like(h, dtype=torch.bool)
    quadrants = classify_quadrants(h, d, mask)
    shares = quadrant_stats(quadrants, d, mask)
    by_role = {}
    total_kl = float(d.sum())
    for role in ("format", "copy", "sum", "answer", "after a mistake"):
        sel = [r for r in rows if r[0] == role]
        if sel:
            by_role[role] = {"tokens": len(sel), "token_share": len(sel) / len(rows),
                             "h_mean": statistics.fmean(r[1] for r in sel),
                             "h_below_0.05": sum(r[1] < 0.05 for r in sel) / len(sel),
                             "rev_kl_mean": statistics.fmean(r[2] for r in sel),
                             "rev_kl_mass_share": sum(r[2] for r in sel) / total_kl}
    ordered = sorted((r[2] for r in rows), reverse=True)
    result = {
        "samples": len(responses), "tokens": len(rows), "temperature": 1.0, "seed": a.seed,
        "response_length": {"min": min(lengths), "median": statistics.median(lengths), "mean": statistics.fmean(lengths),
                            "max": max(lengths), "histogram": dict(sorted(Counter(lengths).items()))},
        "h_below_0.05": sum(r[1] < 0.05 for r in rows) / len(rows),
        "rev_kl_mass_of_top_20pct_tokens": sum(ordered[: len(ordered) // 5]) / total_kl,
        "quadrants_median_split": {k: v for k, v in shares.items() if k.endswith("share")},
        "by_role": by_role,
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    L = result["response_length"]
    print(f"{len(responses)} sampled responses ({a.n} per test prompt, T=1), {len(rows)} tokens; response length "
          f"min {L['min']}, median {L['median']}, mean {L['mean']:.1f}, max {L['max']}")
    print(f"tokens with h < 0.05: {100 * result['h_below_0.05']:.1f}%; reverse-KL mass in the top 20% of tokens: "
          f"{100 * result['rev_kl_mass_of_top_20pct_tokens']:.1f}%\n")
    print("| token role | share of tokens | mean h | h < 0.05 | mean reverse KL | share of reverse-KL mass |")
    print("|---|---|---|---|---|---|")
    for role, r in by_role.items():
        print(f"| {role} | {100 * r['token_share']:.1f}% | {r['h_mean']:.3f} | {100 * r['h_below_0.05']:.0f}% "
              f"| {r['rev_kl_mean']:.3f} | {100 * r['rev_kl_mass_share']:.1f}% |")
    q = result["quadrants_median_split"]
    print("\n| | Q1 (high h, high δ) | Q2 (high h, low δ) | Q3 (low h, high δ) | Q4 (low h, low δ) |")
    print("|---|---|---|---|---|")
    print("| share of tokens | " + " | ".join(f"{100 * q[f'q{i}_share']:.1f}%" for i in range(1, 5)) + " |")
    print("| share of reverse-KL mass | " + " | ".join(f"{100 * q[f'q{i}_divergence_share']:.1f}%" for i in range(1, 5)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
