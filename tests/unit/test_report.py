"""tip-verl-report: the taxonomy figures and tables from records written by TokenRecordWriter."""

import shutil
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from tip_verl import TIPConfig, select_for_batch
from tip_verl.analysis.records import TokenRecordWriter, read_quadrant_shares, read_records
from tip_verl.analysis.cli import main
from tip_verl.analysis.report import QUADRANT_LABELS

VOCAB = 50
CFG = TIPConfig(method="soft_or", ratio=0.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_batch(seed, batch=10, seq=30, full=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (batch,), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.bool) if full else torch.arange(seq)[None, :] < lengths[:, None]
    s_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    t_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    ls, lt = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    y = torch.multinomial(ls.exp().reshape(-1, VOCAB), 1, generator=g).reshape(batch, seq)
    sel = select_for_batch(CFG, entropy_nats=-(ls.exp() * ls).sum(-1), vocab_size=VOCAB,
                           student_logprobs=ls.gather(-1, y[..., None])[..., 0],
                           teacher_logprobs=lt.gather(-1, y[..., None])[..., 0], response_mask=mask)
    return sel, mask, y, [f"s{seed}-{i}" for i in range(batch)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    w = TokenRecordWriter(d, every_n_steps=1, max_rows_per_step=80, seed=3)
    for step in range(5):
        sel, mask, y, ids = make_batch(step)
        w.maybe_write(step, selection=sel, response_mask=mask, token_ids=y, sequence_ids=ids)
    return d


def assert_png(path, min_bytes=10_000):
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, (path, len(data))
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.01  # not a blank image


def pct(x):
    return f"{100 * x:.1f}%"


def test_report_writes_three_pngs_and_prints_the_tables(records, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(records), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    for name in ("plane_step000004.png", "quadrant_shares.png", "text_step000004.png"):
        assert_png(out / name)
    assert "reading records" in cap.err  # tqdm over the 5 files
    lines = [ln.split() for ln in cap.out.splitlines()]
    # the shares table: one row per step with the exact (all-token) shares of quadrant_shares.csv
    shares = read_quadrant_shares(records)
    assert len(shares) == 5
    for _, r in shares.iterrows():
        expected = [str(int(r["step"])), str(int(r["valid_count"])), str(int(r["kept_count"]))]
        expected += [pct(r[f"q{i}_share"]) for i in range(1, 5)] + [pct(r[f"q{i}_kept_share"]) for i in range(1, 5)]
        assert expected in lines, expected
    assert "exact, all tokens of each recorded step" in cap.out
    # the per-quadrant table at the last step: counts and mean h / δ of the sample
    df = read_records(records, steps=[4])
    section = cap.out.split("Per quadrant at step 4")[1].split("Per quadrant over all")[0]
    for q in range(1, 5):
        part = df[df["quadrant"] == q]
        line = next(ln for ln in section.splitlines() if ln.startswith(QUADRANT_LABELS[q]))
        cells = line[len(QUADRANT_LABELS[q]):].split()
        assert cells[0] == str(len(part)) and cells[2] == str(int(part["kept"].sum()))
        assert cells[-2] == f"{part['entropy'].astype(float).mean():.3f}"
        assert cells[-1] == f"{part['divergence'].astype(float).mean():.3f}"
    # the text view: whole sequences as ids, kept ones in [brackets]
    assert cap.out.count("── sequence ") == 3
    first = df[df["sequence_id"] == df["sequence_id"].iloc[0]].sort_values("position")
    expected_text = " ".join(f"[{t}]" if k else str(t) for t, k in zip(first["token_id"], first["kept"]))
    assert expected_text in cap.out.splitlines()


def test_step_option_default_out_and_unknown_step(records, capsys):
    assert main([str(records), "--step", "2", "--max-sequences", "1", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert_png(records / "report" / "plane_step000002.png")
    assert_png(records / "report" / "text_step000002.png")
    assert cap.out.count("── sequence ") == 1 and "(step 2)" in cap.out
    assert cap.err == ""  # no progress bar
    assert main([str(records), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "no records for step 7" in err and "recorded steps: 0, 1, 2, 3, 4" in err and "Traceback" not in err


def test_shares_are_estimated_from_the_samples_without_the_csv(records, tmp_path, capsys):
    d = tmp_path / "only_parquet"
    d.mkdir()
    for p in records.glob("tokens_step*.parquet"):
        shutil.copy(p, d / p.name)
    assert main([str(d), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "estimated from the sampled records" in out and "thresholds at step 4: unknown" in out
    df = read_records(d, steps=[3])
    n, k = len(df), int(df["kept"].sum())
    row = ["3", str(n), str(k)] + [pct((df["quadrant"] == q).sum() / n) for q in range(1, 5)]
    row += [pct(((df["quadrant"] == q) & df["kept"]).sum() / k) for q in range(1, 5)]
    assert row in [ln.split() for ln in out.splitlines()]
    for name in ("plane_step000004.png", "quadrant_shares.png", "text_step000004.png"):
        assert_png(d / "report" / name)


def test_directory_without_records_exits_2_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    # `python -m tip_verl.analysis.cli DIR`, checking afterwards that verl was never imported
    code = ("import runpy, sys\n"
            "try:\n    runpy.run_module('tip_verl.analysis.cli', run_name='__main__', alter_sys=True)\n"
            "finally:\n    assert not [m for m in sys.modules if m.split('.')[0] == 'verl'], 'verl imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(empty)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tip-verl-report: error: no TIP token records in")
    assert str(empty) in proc.stderr and "tokens_step" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (empty / "report").exists()
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tokenizer_backed_text_view_shows_text_and_top_choices(tmp_path, capsys):
    from tip_verl.assets.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    text = "What is 12 plus 7? Answer: the sum of 12 and 7 is 19."
    ids = tok.encode(text, add_special_tokens=False)
    sel, mask, _, seq_ids = make_batch(11, batch=2, seq=len(ids), full=True)
    token_ids = torch.tensor([ids, ids])
    student_top = token_ids.clone()  # the student's top choice is the sampled token ...
    teacher_top = torch.full_like(token_ids, tok.convert_tokens_to_ids("Ġthe"))  # ... the teacher prefers " the"
    g = torch.Generator().manual_seed(0)
    sp, tp = torch.rand(2, len(ids), generator=g), torch.rand(2, len(ids), generator=g)
    records = tmp_path / "rec"
    w = TokenRecordWriter(records, every_n_steps=5, max_rows_per_step=1000)
    w.maybe_write(10, selection=sel, response_mask=mask, token_ids=token_ids, sequence_ids=seq_ids,
                  extra=dict(student_top_id=student_top, student_top_prob=sp, teacher_top_id=teacher_top,
                             teacher_top_prob=tp))
    assert main([str(records), "--tokenizer", str(tok_dir), "--max-sequences", "2", "--max-detail", "100",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert_png(records / "report" / "text_step000010.png")
    df = read_records(records)
    for sid in seq_ids:
        rows = df[df["sequence_id"] == sid].sort_values("position")
        pieces = [tok.decode([t]) for t in rows["token_id"]]
        assert "".join(pieces) == text
        expected = "".join(f"[{p}]" if k else p for p, k in zip(pieces, rows["kept"]))
        assert expected in out.splitlines()
        # the per-token table: decoded token, student's and teacher's top choices with probabilities
        section = out.split(f"sequence {sid} ")[1].split("──")[0]
        kept = rows[rows["kept"]]
        assert len(kept) > 0
        for _, r in kept.iterrows():
            line = next(ln for ln in section.splitlines() if ln.split()[:1] == [str(r["position"])])
            assert repr(tok.decode([r["token_id"]])) in line
            assert f"{repr(tok.decode([r['student_top_id']]))} {pct(r['student_top_prob'])}" in line
            assert f"' the' {pct(r['teacher_top_prob'])}" in line
            assert f"Q{r['quadrant']}" in line and f"{r['entropy']:.3f}" in line
    assert main([str(records), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def _error_lines(err):
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("tip-verl-report: error: ") and "Traceback" not in err, err
    return lines


@pytest.mark.parametrize("bad_out", ["/proc/forbidden/x", "file"])
def test_unwritable_out_is_one_error_line(records, tmp_path, capsys, bad_out):
    if bad_out == "file":
        bad_out = tmp_path / "a_file"
        bad_out.write_text("")
    assert main([str(records), "--out", str(bad_out), "--no-progress"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "output folder (--out)" in lines[0] and str(bad_out) in lines[0]


def _copy_records(records, d, steps=range(5)):
    d.mkdir()
    for step in steps:
        name = f"tokens_step{step:06d}.parquet"
        shutil.copy(records / name, d / name)
    return d


def test_wrong_columns_parquet_is_one_line_and_leaves_no_report_folder(tmp_path, capsys):
    import pandas as pd

    d = tmp_path / "wrong"
    d.mkdir()
    pd.DataFrame({"a": [1, 2], "b": [0.5, 0.25]}).to_parquet(d / "tokens_step000001.parquet")
    assert main([str(d), "--no-progress"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 2
    assert lines[0].startswith("tip-verl-report: warning: skipping unreadable records file ")
    assert "tokens_step000001.parquet" in lines[0] and "lacks the columns ['step'" in lines[0]
    assert lines[1] == (f"tip-verl-report: error: no readable records file in {str(d)!r} (1 skipped, see the "
                        "warnings above)")
    assert not (d / "report").exists()


def test_truncated_records_file_is_skipped_with_a_warning(records, tmp_path, capsys):
    d = _copy_records(records, tmp_path / "truncated")
    bad = d / "tokens_step000004.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    assert main([str(d), "--no-progress"]) == 0  # the report goes on with steps 0..3
    cap = capsys.readouterr()
    warning = cap.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("tip-verl-report: warning: skipping unreadable records file")
    assert str(bad) in warning[0]
    assert "4 records files, steps 0..3" in cap.out and "(1 unreadable file(s) skipped)" in cap.out
    assert_png(d / "report" / "plane_step000003.png")
    assert main([str(d), "--step", "4", "--out", str(tmp_path / "r4"), "--no-progress"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert "the records file of step 4 cannot be read" in lines[-1] and str(bad) in lines[-1]
    assert not (tmp_path / "r4").exists()


def test_failed_figure_write_removes_the_folders_it_created(records, tmp_path, capsys, monkeypatch):
    import tip_verl.analysis.report as report

    def disk_full(path, *args, **kwargs):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "_text_png", disk_full)
    out = tmp_path / "new" / "report"
    assert main([str(records), "--out", str(out), "--no-progress"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot write the figures to" in lines[0] and "No space left on device" in lines[0]
    assert not (tmp_path / "new").exists()
