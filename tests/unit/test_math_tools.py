"""Math data preparation (tip_verl.tools.math_data) and mean@n evaluation (tip_verl.tools.eval_math)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tip_verl.tools import eval_math, math_data
from tip_verl.tools.math_data import INSTRUCTION

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def _read(path) -> list[dict]:
    return [eval_math._plain(r) for r in pd.read_parquet(path).to_dict("records")]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------ preparation
@pytest.fixture()
def raw_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    # DAPO-Math-17k layout: chat prompt wrapped in DAPO's "Answer:" template, answer in
    # reward_model.ground_truth, every problem repeated.
    dapo_rows = []
    for _ in range(3):
        for problem, answer in [("What is 2+3?", "5"), ("Find x if 2x = 8.", "4")]:
            dapo_rows.append({
                "data_source": "math_dapo",
                "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(problem=problem)}],
                "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": "some-uuid"},
            })
    # a hub download folder: data/*.parquet next to a README and a metadata JSON
    (raw / "dapo" / "data").mkdir(parents=True)
    pd.DataFrame(dapo_rows).to_parquet(raw / "dapo" / "data" / "dapo-math-17k.parquet")
    (raw / "dapo" / "README.md").write_text("# DAPO-Math-17k")
    (raw / "dapo" / "dataset_infos.json").write_text(json.dumps({"default": {"features": {}}}))
    # MATH-500 layout (JSONL): problem / solution / answer; `answer` wins over `solution`.
    _write_jsonl(raw / "math500.jsonl", [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.", "solution": "So \\boxed{\\frac{5}{6}}.",
         "answer": "\\frac{5}{6}", "subject": "Algebra", "level": 1, "unique_id": "a"},
        {"problem": "What is $6\\cdot 7$?", "solution": "\\boxed{42}", "answer": "42",
         "subject": "Prealgebra", "level": 1, "unique_id": "b"},
    ])
    # Maxwell-Jia/AIME_2024 layout (JSON list): capitalised columns, integer answers.
    (raw / "aime24.json").write_text(json.dumps([
        {"ID": "2024-I-1", "Problem": "AIME problem one", "Solution": "long", "Answer": 204},
        {"ID": "2024-I-2", "Problem": "AIME problem two", "Solution": "long", "Answer": 25},
    ]), encoding="utf-8")
    # opencompass/AIME2025 layout: a folder of JSONL files with question / answer.
    aime25 = raw / "aime25"
    aime25.mkdir()
    _write_jsonl(aime25 / "aime2025-I.jsonl", [{"question": "Q one", "answer": "70"}])
    _write_jsonl(aime25 / "aime2025-II.jsonl", [{"question": "Q two", "answer": "588"}])
    (aime25 / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {}}}))
    (aime25 / ".cache").mkdir()
    _write_jsonl(aime25 / ".cache" / "ignored.jsonl", [{"question": "hidden", "answer": "0"}])
    return raw


def test_prepare_all_datasets_layout_and_ground_truths(raw_files, tmp_path, capsys):
    out = tmp_path / "data"
    rc = math_data.main(["--dapo", str(raw_files / "dapo"), "--math500", str(raw_files / "math500.jsonl"),
                         "--aime24", str(raw_files / "aime24.json"), "--aime25", str(raw_files / "aime25"),
                         "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["aime24.parquet", "aime25.parquet", "math500.parquet",
                                                     "train.parquet"]
    expected = {
        "train.parquet": ("math_dapo", "train", [("What is 2+3?", "5"), ("Find x if 2x = 8.", "4")]),
        "math500.parquet": ("HuggingFaceH4/MATH-500", "test",
                            [("Compute $\\frac{1}{2}+\\frac{1}{3}$.", "\\frac{5}{6}"), ("What is $6\\cdot 7$?", "42")]),
        "aime24.parquet": ("aime24", "test", [("AIME problem one", "204"), ("AIME problem two", "25")]),
        "aime25.parquet": ("aime25", "test", [("Q one", "70"), ("Q two", "588")]),
    }
    for name, (source, split, items) in expected.items():
        frame = pd.read_parquet(out / name)
        assert list(frame.columns) == COLUMNS, name
        rows = _read(out / name)
        assert len(rows) == len(items), name  # DAPO duplicates dropped, metadata / hidden files skipped
        for index, (row, (problem, answer)) in enumerate(zip(rows, items)):
            assert row["data_source"] == source
            assert row["ability"] == "math"
            assert row["prompt"] == [{"role": "user", "content": f"{problem}\n\n{INSTRUCTION}"}]
            assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
            assert isinstance(row["reward_model"]["ground_truth"], str)
            assert row["extra_info"] == {"split": split, "index": index}
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    report = capsys.readouterr().out
    assert "dropped 4 duplicates" in report and "answer=reward_model.ground_truth" in report
    assert "skipped" not in report  # no row lost to missing problem/answer


def test_prepare_keep_duplicates_and_solution_column(raw_files, tmp_path):
    out = tmp_path / "data"
    assert math_data.main(["--dapo", str(raw_files / "dapo"), "--keep-duplicates", "--out", str(out)]) == 0
    assert len(_read(out / "train.parquet")) == 6
    # Only a full solution: the ground truth is its last \boxed{...}; rows without one are skipped.
    src = tmp_path / "sol.jsonl"
    _write_jsonl(src, [
        {"Question": "q1", "Solution": "First \\boxed{1}, finally \\boxed{\\dfrac{3}{4}}."},
        {"Question": "q2", "Solution": "no box here"},
        {"Question": "q3", "Solution": "\\boxed{7}"},
    ])
    stats = math_data.prepare("math500", src, out)
    assert stats["written"] == 2 and stats["dropped_missing"] == 1 and stats["answer_column"] == "Solution"
    rows = _read(out / "math500.parquet")
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["\\dfrac{3}{4}", "7"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1]


def test_prepare_unknown_columns_error_lists_columns(tmp_path, capsys):
    src = tmp_path / "weird.jsonl"
    _write_jsonl(src, [{"id": 1, "statement": "x", "target": "3"}])
    with pytest.raises(math_data.ColumnError) as err:
        math_data.prepare("aime25", src, tmp_path / "out")
    message = str(err.value)
    assert "['id', 'statement', 'target']" in message
    assert "problem column" in message and "answer column" in message
    assert math_data.main(["--aime25", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "columns found: ['id', 'statement', 'target']" in capsys.readouterr().err
    # a problem column but no answer column: only the answer is reported missing
    _write_jsonl(src, [{"problem": "x", "target": "3"}])
    with pytest.raises(math_data.ColumnError, match=r"answer column .*columns found: \['problem', 'target'\]"):
        math_data.prepare("aime25", src, tmp_path / "out")
    with pytest.raises(SystemExit):
        math_data.main(["--out", str(tmp_path / "out")])  # no input at all
    with pytest.raises(FileNotFoundError):
        math_data.prepare("math500", tmp_path / "missing.jsonl", tmp_path / "out")


# ---------------------------------------------------------------------------------------- scoring
def test_verl_math_checker_accepts_right_box_and_rejects_wrong():
    fn, name = eval_math.resolve_score_fn(None)
    assert name == "verl.utils.reward_score.default_compute_score"
    from verl.utils.reward_score import default_compute_score

    assert fn is default_compute_score
    for spec in math_data.DATASETS.values():  # every data_source the prepare tool writes
        right = fn(spec.data_source, "The sum is \\boxed{42}", "42")
        wrong = fn(spec.data_source, "The sum is \\boxed{41}", "42")
        assert eval_math.score_binary(right) == 1.0, spec.data_source
        assert eval_math.score_binary(wrong) == 0.0, spec.data_source
    # MATH-500 uses MATH string normalisation: equivalent LaTeX forms match
    assert eval_math.score_binary(fn("HuggingFaceH4/MATH-500", "\\boxed{\\frac{1}{2}}", "\\frac12")) == 1.0
    assert eval_math.score_binary({"score": -1.0, "acc": False}) == 0.0
    assert eval_math.score_binary({"score": 1.0}) == 1.0


def test_score_fn_specs(tmp_path):
    tiny, name = eval_math.resolve_score_fn("tiny_addition")
    assert name.endswith("assets/reward.py:compute_score")
    assert tiny("tip_tiny_addition", "12", "12") == 1.0
    assert tiny("tip_tiny_addition", "13", "12") == 0.0
    custom = tmp_path / "my_score.py"
    custom.write_text("def check(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(ground_truth in solution_str)\n")
    fn, name = eval_math.resolve_score_fn(f"{custom}:check")
    assert name == f"{custom}:check" and fn("x", "a 7 b", "7") == 1.0
    for bad in (f"{custom}:nope", f"{tmp_path}/none.py:check", "no_colon"):
        with pytest.raises(ValueError):
            eval_math.resolve_score_fn(bad)


def test_summarize_mean_std_best():
    s = eval_math.summarize([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert s["per_sample_mean"] == pytest.approx([2 / 3, 1 / 3])
    assert s["mean"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx(1 / 6)
    assert s["best_at_n"] == pytest.approx(2 / 3)
    assert (s["num_problems"], s["n"]) == (3, 2)
    with pytest.raises(ValueError):
        eval_math.summarize([[1.0], [1.0, 0.0]])


# ------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 1-layer Qwen2 with a character-level ChatML tokenizer (built in a second)."""
    import torch
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_math_model")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<unk>")
    tok.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture()
def eval_data(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_jsonl(raw / "m.jsonl", [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)])
    _write_jsonl(raw / "a.jsonl", [{"question": "Q", "answer": "7"}, {"question": "R", "answer": "9"}])
    out = tmp_path / "data"
    math_data.prepare("math500", raw / "m.jsonl", out)
    math_data.prepare("aime24", raw / "a.jsonl", out)
    return out / "math500.parquet", out / "aime24.parquet"


def _samples(out, name):
    return [json.loads(line) for line in (out / f"{name}_samples.jsonl").read_text().splitlines()]


def test_eval_hf_backend_mean_at_n_with_verl_checker(tiny_model, eval_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_model), "--data", *map(str, eval_data), "--n", "2", "--temperature", "1.0",
            "--backend", "hf", "--max-new-tokens", "6", "--out", str(out)]
    assert eval_math.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"math500", "aime24"}
    assert (results["n"], results["temperature"], results["backend"]) == (2, 1.0, "hf")
    assert results["score_fn"] == "verl.utils.reward_score.default_compute_score"
    from verl.utils.reward_score import default_compute_score

    for name, count in (("math500", 3), ("aime24", 2)):
        summary = results["datasets"][name]
        assert summary["num_problems"] == count and summary["n"] == 2
        assert 0.0 <= summary["mean"] <= 1.0 and 0.0 <= summary["best_at_n"] <= 1.0
        samples = _samples(out, name)
        assert len(samples) == count
        grid = []
        for row in samples:
            assert len(row["responses"]) == 2 and all(isinstance(r, str) for r in row["responses"])
            rescored = [eval_math.score_binary(default_compute_score(row["data_source"], r, row["ground_truth"]))
                        for r in row["responses"]]
            assert row["scores"] == rescored
            grid.append(row["scores"])
        flat = [s for r in grid for s in r]
        assert summary["mean"] == pytest.approx(sum(flat) / len(flat))
        assert summary["per_sample_mean"] == pytest.approx([sum(r[k] for r in grid) / count for k in range(2)])
    assert [r["ground_truth"] for r in _samples(out, "aime24")] == ["7", "9"]
    table = (out / "results.md").read_text()
    assert "| dataset | problems | mean@2 (%) | std (%) | best@2 (%) |" in table
    assert "| math500 | 3 |" in table and "| aime24 | 2 |" in table
    # same seed -> same samples
    again = tmp_path / "eval_again"
    assert eval_math.main([*argv[:-1], str(again)]) == 0
    assert _samples(again, "math500") == _samples(out, "math500")


def test_eval_custom_score_fn_and_greedy(tiny_model, eval_data, tmp_path):
    score_file = tmp_path / "parity.py"
    score_file.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                          "    assert extra_info['split'] == 'test'\n"
                          "    return 1.0 if len(solution_str) % 2 == 0 else 0.0\n")
    out = tmp_path / "eval"
    assert eval_math.main(["--model", str(tiny_model), "--data", str(eval_data[0]), "--n", "3", "--backend", "hf",
                           "--max-new-tokens", "5", "--score-fn", f"{score_file}:score", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["datasets"]["math500"]
    samples = _samples(out, "math500")
    grid = [[1.0 if len(r) % 2 == 0 else 0.0 for r in row["responses"]] for row in samples]
    assert [row["scores"] for row in samples] == grid
    expected = eval_math.summarize(grid)
    for key in ("mean", "std", "best_at_n", "per_sample_mean"):
        assert summary[key] == pytest.approx(expected[key])
    # temperature 0: greedy, the n responses are identical and the std over samples is 0
    greedy = tmp_path / "greedy"
    assert eval_math.main(["--model", str(tiny_model), "--data", str(eval_data[1]), "--n", "2", "--temperature", "0",
                           "--backend", "hf", "--max-new-tokens", "5", "--score-fn", "tiny_addition",
                           "--out", str(greedy)]) == 0
    summary = json.loads((greedy / "results.json").read_text())["datasets"]["aime24"]
    assert summary["std"] == 0.0 and not math.isnan(summary["mean"])
    assert all(row["responses"][0] == row["responses"][1] for row in _samples(greedy, "aime24"))


def test_eval_cli_rejects_missing_data(tmp_path):
    with pytest.raises(SystemExit):
        eval_math.main(["--model", str(tmp_path), "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path)])
