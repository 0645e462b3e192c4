"""Tests for the tiny asset builder (tokenizer, task data, reward, models, build cache)."""

import dataclasses
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tip_verl.assets import (
    DEFAULT_ASSETS_DIR,
    AssetPaths,
    BuildConfig,
    _build_assets,
    build_assets,
    check_tokenizer,
)
from tip_verl.assets import models as M
from tip_verl.assets.models import ModelConfig
from tip_verl.assets.task import DATA_SOURCE, TaskConfig, make_rows, split_pairs, training_stream, write_parquets
from tip_verl.assets.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, build_tokenizer, load_tokenizer

REWARD_FILE = Path(__file__).resolve().parents[2] / "tip_verl" / "assets" / "reward.py"
QUESTION_RE = re.compile(r"^What is (\d+) \+ (\d+)\?$")

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_tok_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------------------- tokenizer


def test_newline_is_one_token(tok, saved_tok_dir):
    for t in (tok, load_tokenizer(saved_tok_dir)):
        ids = t.encode("\n", add_special_tokens=False)
        assert len(ids) == 1
        assert t.decode(ids) == "\n"
    assert check_tokenizer(saved_tok_dir) is not None
    assert check_tokenizer(tok) is tok


def test_special_tokens_and_digits(tok):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert len({tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.convert_tokens_to_ids("<|im_start|>")}) == 4
    ids = tok.encode("1234567890", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")
    assert tok.encode(EOS_TOKEN, add_special_tokens=False) == [tok.eos_token_id]
    # the task's words are single tokens
    for word in ("What", "is", "user", "assistant"):
        assert tok.convert_ids_to_tokens(tok.encode(word, add_special_tokens=False)) == [word]
    assert tok.convert_ids_to_tokens(tok.encode(" is", add_special_tokens=False)) == ["\u0120is"]


def test_loads_identically_as_qwen2_tokenizer(tok, tmp_path):
    """Next to a qwen2 config.json, AutoTokenizer picks Qwen2Tokenizer, which rebuilds the pipeline
    from the vocabulary and merges: the result must be the very same tokenizer."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    for text in ("<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n<|im_start|>assistant\n",
                 "Hello,  wörld!\n\n\tx = 3*(4+5) 日本", "the sum of 7 and 8 is 15<|im_end|>"):
        ids = tok.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    check_tokenizer(tmp_path)


def test_chat_template_round_trip(tok, saved_tok_dir):
    messages = [{"role": "user", "content": "What is 12 + 345?"}]
    expected = "<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n<|im_start|>assistant\n"
    loaded = load_tokenizer(saved_tok_dir)
    for t in (tok, loaded):
        text = t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == expected
        ids = t(text, add_special_tokens=False)["input_ids"]
        assert t.decode(ids) == expected
        assert t.decode(ids, skip_special_tokens=True) == "user\nWhat is 12 + 345?\nassistant\n"
        # tokenize=True gives the same ids as encoding the rendered text
        rendered = t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rendered = rendered["input_ids"] if not isinstance(rendered, list) else rendered
        assert list(rendered) == list(ids)
    assert loaded.chat_template == CHAT_TEMPLATE
    # without the generation prompt the turn ends with "<|im_end|>\n" (Qwen ChatML)
    assert tok.apply_chat_template(messages, tokenize=False).endswith("?<|im_end|>\n")
    # a response decodes to the digits then eos
    response = tok.encode("357", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(response) == "357<|im_end|>"
    assert tok.decode(response, skip_special_tokens=True) == "357"
    # arbitrary ASCII text round-trips exactly
    text = "Hello, world!\n\tx = 3*(4+5) ~ {ok} \u00e9\u65e5"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_is_append_only(tok):
    """verl's continuous-token builder needs render(prefix) to be a token prefix of render(full)."""
    sys_msg = {"role": "system", "content": "continuous token synthetic system"}
    user = {"role": "user", "content": "What is 1 + 2?"}
    assistant = {"role": "assistant", "content": "3"}

    def ids(msgs, gen=False):
        out = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(out if isinstance(out, list) else out["input_ids"])

    prefix = ids([sys_msg, user])
    full = ids([sys_msg, user, assistant, user], gen=True)
    assert full[: len(prefix)] == prefix
    assert prefix[-2:] == [tok.eos_token_id, tok.encode("\n", add_special_tokens=False)[0]]


def test_check_tokenizer_rejects_two_token_newline(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a byte-level-like vocabulary where "\n" only exists as two pieces ("\\" "n" after escaping)
    vocab = {"<pad>": 0, "<|im_end|>": 1, "<unk>": 2, "\\": 3, "n": 4, "a": 5}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace("\n", "\\n")
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    bad = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    assert len(bad.encode("\n", add_special_tokens=False)) == 2
    with pytest.raises(ValueError, match="newline"):
        check_tokenizer(bad)
    bad.save_pretrained(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="exactly one token"):
        check_tokenizer(tmp_path / "bad")


def test_qwen_continuous_token_builder_accepts_tokenizer(tok):
    """The real verl check (importing verl in a test is fine; the assets modules never do)."""
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    builder = QwenContinuousTokenBuilder(tok)
    ids = builder.build_initial_tokens([{"role": "user", "content": "What is 1 + 2?"}])
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------- task


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    cfg = TaskConfig()
    write_parquets(cfg, 0, root / "train.parquet", root / "test.parquet")
    return cfg, pd.read_parquet(root / "train.parquet"), pd.read_parquet(root / "test.parquet")


def test_parquet_layout(task_files):
    cfg, train, test = task_files
    assert len(train) == cfg.n_train and len(test) == cfg.n_test
    for df, split in ((train, "train"), (test, "test")):
        assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(df.columns)
        assert (df["data_source"] == DATA_SOURCE).all()
        row = df.iloc[0]
        prompt = list(row["prompt"])
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        assert row["reward_model"]["style"] == "rule"
        assert isinstance(row["reward_model"]["ground_truth"], str)
        assert [e["split"] for e in df["extra_info"]] == [split] * len(df)
        assert [int(e["index"]) for e in df["extra_info"]] == list(range(len(df)))


def _pairs_and_truths(df):
    out = []
    for prompt, rm in zip(df["prompt"], df["reward_model"]):
        m = QUESTION_RE.match(list(prompt)[0]["content"])
        assert m, prompt
        out.append(((int(m.group(1)), int(m.group(2))), rm["ground_truth"]))
    return out


def test_ground_truths_are_correct_sums(task_files, tok):
    cfg, train, test = task_files
    for df in (train, test):
        for (a, b), truth in _pairs_and_truths(df):
            assert truth == str(a + b)
            assert 10 ** (cfg.min_digits - 1) <= min(a, b) and max(a, b) < 10**cfg.max_digits
            # response = one line of 8-9 tokens per column (carry digit or not) + the answer + eos
            columns = len(str(max(a, b)))
            n_tokens = len(M.encode_response(tok, a, b))
            assert 8 * columns + len(truth) + 1 <= n_tokens <= 9 * columns + len(truth) + 1 <= M.MAX_RESPONSE_TOKENS


def test_worked_solution_adds_column_by_column():
    from tip_verl.assets.task import solution

    assert solution(347, 85) == "7+5+0=12\n4+8+1=13\n3+0+1=4\n432"
    assert solution(99, 1) == "9+1+0=10\n9+0+1=10\n100"
    assert solution(0, 0) == "0+0+0=0\n0"
    for a, b in [(12, 907), (555, 445), (10, 10)]:
        lines = solution(a, b).split("\n")
        assert lines[-1] == str(a + b)
        assert M.response_is_well_formed(solution(a, b) + "<|im_end|>")
    with pytest.raises(ValueError, match="non-negative"):
        solution(-1, 2)
    with pytest.raises(ValueError, match="min_digits"):
        TaskConfig(min_digits=3, max_digits=2)


def test_task_deterministic_and_disjoint(task_files, tmp_path):
    cfg, train, test = task_files
    write_parquets(cfg, 0, tmp_path / "tr.parquet", tmp_path / "te.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "tr.parquet"), train)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "te.parquet"), test)
    train_pairs = {p for p, _ in _pairs_and_truths(train)}
    test_pairs = {p for p, _ in _pairs_and_truths(test)}
    assert len(train_pairs) == len(train) and len(test_pairs) == len(test)  # no duplicates
    assert not train_pairs & test_pairs
    other = split_pairs(cfg, 1)
    assert other["test"] != split_pairs(cfg, 0)["test"]  # the seed matters
    # the supervised-training stream never shows a test problem
    stream = training_stream(cfg, 0, test_pairs, "teacher")
    assert not {next(stream) for _ in range(5000)} & test_pairs


# -------------------------------------------------------------------------------------------- reward


def _load_reward_standalone():
    spec = importlib.util.spec_from_file_location("tip_reward_standalone", str(REWARD_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_cases():
    score = _load_reward_standalone().compute_score
    assert score(DATA_SOURCE, "357", "357") == 1.0
    assert score(DATA_SOURCE, "357<|im_end|>", "357") == 1.0
    assert score(DATA_SOURCE, " 357 \n", "357") == 1.0
    assert score(DATA_SOURCE, "3 5 7<|im_end|><|endoftext|><|endoftext|>", "357") == 1.0
    assert score(DATA_SOURCE, "357<|im_end|>12", "357") == 1.0  # text after the end of turn is ignored
    assert score(DATA_SOURCE, "358", "357") == 0.0
    assert score(DATA_SOURCE, "3570", "357") == 0.0
    assert score(DATA_SOURCE, "35", "357") == 0.0
    assert score(DATA_SOURCE, "", "357") == 0.0
    assert score(DATA_SOURCE, "<|im_end|>357", "357") == 0.0
    assert score(DATA_SOURCE, "The answer is 357", "357") == 0.0
    assert score(DATA_SOURCE, "357", "357", extra_info={"split": "test", "index": 0}, other_kwarg=1) == 1.0
    # a worked solution: only its last line is the answer
    assert score(DATA_SOURCE, "7+5+0=12\n4+8+1=13\n3+0+1=4\n432<|im_end|>", "432") == 1.0
    assert score(DATA_SOURCE, "7+5+0=12\n4+8+1=13\n3+0+1=4\n432\n<|im_end|>", "432") == 1.0
    assert score(DATA_SOURCE, "7+5+0=11\n4+8+1=13\n3+0+1=4\n432", "432") == 1.0  # a wrong step, right answer
    assert score(DATA_SOURCE, "7+5+0=12\n4+8+1=13\n3+0+1=4\n431", "432") == 0.0
    assert score(DATA_SOURCE, "7+5+0=12\n4+8+1=13\n432\n3+0+1=4", "432") == 0.0
    assert score(DATA_SOURCE, "432\n\n<|im_end|>", "432") == 1.0
    assert isinstance(score(DATA_SOURCE, "357", "357"), float)


def test_reward_loads_standalone_in_fresh_interpreter(tmp_path):
    """verl imports the file by path in its own processes: it must not need the package."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('r', {str(REWARD_FILE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'tip_verl' not in sys.modules\n"
        "print(m.compute_score('tip_tiny_addition', '42<|im_end|>', '42'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0"


# -------------------------------------------------------------------------------------------- models

QUICK_STEPS = dict(student_steps=2, teacher_steps=3)

# Build-mechanics tests use very small models and splits so each build takes about a second.
TINY = BuildConfig(
    task=TaskConfig(n_train=32, n_test=8),
    student=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
    teacher=ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
)


def _tiny_build(out, **kw):
    kw.setdefault("student_steps", 1)
    kw.setdefault("teacher_steps", 1)
    return _build_assets(out, seed=0, quiet=True, config=TINY, **kw)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    """The real build config (models, task) with only a few training steps."""
    out = tmp_path_factory.mktemp("quick") / "assets"
    t0 = time.time()
    paths = _build_assets(out, seed=0, quiet=True, **QUICK_STEPS)
    return paths, time.time() - t0


def test_quick_build_layout(quick_build):
    paths, _ = quick_build
    assert isinstance(paths, AssetPaths)
    assert paths == AssetPaths.under(paths.root)
    for p in (paths.train_parquet, paths.test_parquet, paths.reward_fn, paths.manifest):
        assert p.is_file()
    assert paths.reward_fn.read_bytes() == REWARD_FILE.read_bytes()
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["config"] == BuildConfig().with_steps(**QUICK_STEPS).to_dict()
    assert manifest["config"]["teacher_train"]["steps"] == 3
    for role in ("student", "teacher"):
        acc = manifest["accuracy"][role]
        for k in ("greedy", "sampled_t1", "well_formed_greedy", "well_formed_sampled_t1"):
            assert 0.0 <= acc[k] <= 1.0
    assert manifest["tokenizer"]["chat_template"] == CHAT_TEMPLATE
    # the data in the build is the task's data for the seed
    expected = pd.DataFrame(make_rows(split_pairs(TaskConfig(), 0)["test"], "test"))
    pd.testing.assert_frame_equal(pd.read_parquet(paths.test_parquet), expected)
    # no temporary directories are left beside the output
    assert _siblings(paths.root) == ["assets"]


def test_quick_build_models(quick_build):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    paths, _ = quick_build
    tok = check_tokenizer(paths.student)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # how verl's AutoTokenizer loads it
    sizes = {}
    for role in ("student", "teacher"):
        d = getattr(paths, role)
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.model_type == "qwen2" and cfg.architectures == ["Qwen2ForCausalLM"]
        assert cfg.tie_word_embeddings is False
        assert cfg.vocab_size == len(tok)
        gen = GenerationConfig.from_pretrained(d)
        assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
        model = AutoModelForCausalLM.from_pretrained(d)
        assert next(model.parameters()).dtype == torch.float32
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        sizes[role] = sum(p.numel() for p in model.parameters())
        assert load_tokenizer(d).get_vocab() == tok.get_vocab()
        assert load_tokenizer(d).chat_template == CHAT_TEMPLATE
    assert sizes["teacher"] > 2 * sizes["student"]


def test_quick_build_cache_hit_and_cli(quick_build, capsys):
    from tip_verl.assets import cli

    paths, first = quick_build
    mtime = paths.manifest.stat().st_mtime_ns
    t0 = time.time()
    assert _build_assets(paths.root, seed=0, quiet=True, **QUICK_STEPS) == paths
    assert time.time() - t0 < min(2.0, first / 2)
    assert paths.manifest.stat().st_mtime_ns == mtime

    # the CLI on the same build: a cache hit that prints the paths and both accuracies
    rc = cli.main(["--out", str(paths.root), "--quiet", "--student-steps", "2", "--teacher-steps", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"student: {paths.student}" in text and f"teacher: {paths.teacher}" in text
    assert f"reward_fn: {paths.reward_fn}" in text
    assert re.search(r"teacher accuracy: greedy \d\.\d{3}, sampled\(T=1\) \d\.\d{3}", text)
    assert re.search(r"student accuracy: greedy \d\.\d{3}, sampled\(T=1\) \d\.\d{3}", text)
    assert paths.manifest.stat().st_mtime_ns == mtime


def test_rebuild_on_incomplete_corrupt_changed_or_forced(tmp_path, capsys):
    out = tmp_path / "assets"
    paths = _tiny_build(out)
    stamp = lambda: paths.manifest.stat().st_mtime_ns  # noqa: E731

    # an incomplete build is not reused
    (paths.teacher / "model.safetensors").unlink()
    before = stamp()
    _tiny_build(out)
    assert (paths.teacher / "model.safetensors").is_file() and stamp() != before

    # a corrupted (here: truncated) checkpoint is found by its sha256 and rebuilt, with a message
    weights = paths.student / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    before = stamp()
    _tiny_build(out)
    assert weights.read_bytes() == good and stamp() != before
    err = capsys.readouterr().err
    assert "cannot be used: content changed since it was built (sha256 mismatch: student/model.safetensors)" in err, err
    # a manifest from before content hashes gets them pinned once, from the files as they are (no rebuild)
    manifest = json.loads(paths.manifest.read_text())
    pinned = manifest.pop("sha256")
    assert pinned["teacher/model.safetensors"] == hashlib.sha256(
        (paths.teacher / "model.safetensors").read_bytes()).hexdigest()
    assert {"data/train.parquet", "student/config.json", "student/tokenizer.json"} <= set(pinned)
    paths.manifest.write_text(json.dumps(manifest))
    weights_mtime = weights.stat().st_mtime_ns
    _tiny_build(out)
    assert json.loads(paths.manifest.read_text())["sha256"] == pinned
    assert weights.stat().st_mtime_ns == weights_mtime

    # a different config (or seed) is not reused
    before = stamp()
    _tiny_build(out, teacher_steps=2)
    assert json.loads(paths.manifest.read_text())["config"]["teacher_train"]["steps"] == 2 and stamp() != before
    before = stamp()
    _tiny_build(out, teacher_steps=2)
    assert stamp() == before  # same config: reused
    _build_assets(out, seed=1, quiet=True, config=TINY, student_steps=1, teacher_steps=2)
    assert json.loads(paths.manifest.read_text())["seed"] == 1

    # force rebuilds even when everything matches
    before = stamp()
    _build_assets(out, seed=1, quiet=True, force=True, config=TINY, student_steps=1, teacher_steps=2)
    assert stamp() != before
    assert _siblings(out) == ["assets"]

    # a stale reward copy is refreshed without a rebuild
    paths.reward_fn.write_text("# stale\n")
    before = stamp()
    _build_assets(out, seed=1, quiet=True, config=TINY, student_steps=1, teacher_steps=2)
    assert stamp() == before and paths.reward_fn.read_bytes() == REWARD_FILE.read_bytes()


def test_refuses_to_replace_foreign_dir_and_cleans_leftovers(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        _tiny_build(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    # a build interrupted mid-way leaves only a hidden temp dir, which the next build removes
    (tmp_path / ".assets.tmp-dead").mkdir()
    (tmp_path / ".assets.tmp-dead" / "manifest.json").write_text("{}")
    paths = _tiny_build(tmp_path / "assets")
    assert paths.manifest.is_file()
    assert not (tmp_path / ".assets.tmp-dead").exists()


def test_failed_build_leaves_previous_build_intact(tmp_path):
    out = tmp_path / "assets"
    paths = _tiny_build(out)
    manifest = paths.manifest.read_text()
    # a config whose data step fails inside the build (too many test problems for 1-digit numbers)
    bad = dataclasses.replace(TINY, task=TaskConfig(min_digits=1, max_digits=1, n_train=32, n_test=64))
    with pytest.raises(ValueError, match="too few distinct problems"):
        _build_assets(out, seed=0, quiet=True, config=bad, student_steps=1, teacher_steps=1)
    assert paths.manifest.read_text() == manifest
    assert (paths.student / "model.safetensors").is_file()
    assert _siblings(out) == ["assets"]  # the temporary build dir was removed


def test_default_dir_and_env(monkeypatch, tmp_path):
    from tip_verl.assets import resolve_out_dir

    assert DEFAULT_ASSETS_DIR == Path("~/.cache/tip_verl/assets-v2").expanduser()
    monkeypatch.delenv("TIP_VERL_ASSETS", raising=False)
    assert resolve_out_dir() == DEFAULT_ASSETS_DIR.resolve()
    monkeypatch.setenv("TIP_VERL_ASSETS", str(tmp_path / "x"))
    assert resolve_out_dir() == (tmp_path / "x").resolve()
    assert resolve_out_dir(tmp_path / "y") == (tmp_path / "y").resolve()
    # build_assets() with no out_dir uses the env var
    _tiny_build(None)
    assert (tmp_path / "x" / "manifest.json").is_file()


def test_training_learns_the_format(tok):
    """A few seconds of supervised training already produce well-formed answers."""
    cfg = TaskConfig()
    test_pairs = split_pairs(cfg, 0)["test"][:32]
    model = M.build_model(BuildConfig().student, tok, seed=0)
    before = M.generate_answers(model, tok, test_pairs, do_sample=False)
    stats = M.train(model, tok, training_stream(cfg, 0, set(test_pairs), "t"),
                    M.TrainConfig(steps=120, batch_size=32, lr=3e-3), seed=0)
    after = M.generate_answers(model, tok, test_pairs, do_sample=False)
    assert stats["final_loss"] < 2.5
    assert sum(map(M.response_is_well_formed, after)) > sum(map(M.response_is_well_formed, before))
    assert sum(map(M.response_is_well_formed, after)) >= 0.75 * len(after)


# ---------------------------------------------------------------------------------- full build (slow)


@pytest.mark.slow
def test_full_build_teacher_beats_student(tiny_assets):
    # The session's full build (tests/conftest.py), shared with the end-to-end tests: one build per CI run.
    paths = tiny_assets
    out = paths.root
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["config"] == BuildConfig().to_dict()
    acc = manifest["accuracy"]
    assert acc["teacher"]["greedy"] >= 0.85 and acc["teacher"]["sampled_t1"] >= 0.8
    assert acc["student"]["sampled_t1"] <= 0.35
    assert acc["teacher"]["greedy"] > acc["student"]["greedy"] + 0.3
    assert acc["teacher"]["sampled_t1"] > acc["student"]["sampled_t1"] + 0.4
    # the student writes the format and gets some answers right: distillation has a start and room to go
    assert acc["student"]["well_formed_sampled_t1"] >= 0.7
    assert acc["student"]["sampled_t1"] >= 0.1
    assert manifest["build_seconds"] < 240  # the budget: at most 4 minutes on 2 cores

    # the reported numbers are reproducible from the saved checkpoints
    from transformers import AutoModelForCausalLM

    test = pd.read_parquet(paths.test_parquet)
    pairs = [(int(e["a"]), int(e["b"])) for e in test["extra_info"]]
    tok = load_tokenizer(paths.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher)
    assert M.accuracy(teacher, tok, pairs, do_sample=False) == pytest.approx(acc["teacher"]["greedy"])

    # second call with the real config: cache hit, instant
    t0 = time.time()
    assert build_assets(out, seed=0, quiet=True) == paths
    assert time.time() - t0 < 2.0
