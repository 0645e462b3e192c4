"""TokenRecordWriter / read_records: per-token records of the TIP selection (Section 4, App. B.4)."""

import csv
import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tip_verl import TIPConfig, quadrant_stats, select_for_batch
from tip_verl.analysis.records import (COLUMNS, TOP_COLUMNS, TokenRecordWriter, check_writable_dir,
                                       read_quadrant_shares, read_records, read_thresholds, record_path)
from tip_verl.taxonomy import resolve_thresholds

VOCAB = 50
CFG = TIPConfig(method="soft_or", ratio=0.5)
THR = dict(entropy_threshold=0.5, divergence_threshold=0.5, threshold_mode="quantile")


def make_batch(seed, batch=8, seq=30, config=CFG, empty_rows=(), full=False):
    """A random batch through select_for_batch: (selection, mask, token_ids, sequence_ids)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    mask[:, 0] &= torch.rand(batch, generator=g) > 0.3  # some rows do not start at position 0
    for r in empty_rows:
        mask[r] = False
    if full:
        mask[:] = True
    s_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    t_logits = torch.randn(batch, seq, VOCAB, generator=g) * 2
    ls, lt = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    y = torch.multinomial(ls.exp().reshape(-1, VOCAB), 1, generator=g).reshape(batch, seq)
    sel = select_for_batch(config, entropy_nats=-(ls.exp() * ls).sum(-1), vocab_size=VOCAB,
                           student_logprobs=ls.gather(-1, y[..., None])[..., 0],
                           teacher_logprobs=lt.gather(-1, y[..., None])[..., 0], response_mask=mask)
    ids = [f"seq-{seed}-{i}" for i in range(batch)]
    return sel, mask, y, ids, (ls, lt)


def write(writer, step, batch, **kw):
    sel, mask, y, ids, _ = batch
    return writer.maybe_write(step, selection=sel, response_mask=mask, token_ids=y, sequence_ids=ids, **kw)


def test_constructor_validates_arguments(tmp_path):
    for kw, msg in [(dict(every_n_steps="2", max_rows_per_step=10), "every_n_steps"),
                    (dict(every_n_steps=True, max_rows_per_step=10), "every_n_steps"),
                    (dict(every_n_steps=1, max_rows_per_step=0), "max_rows_per_step"),
                    (dict(every_n_steps=1, max_rows_per_step=2.5), "max_rows_per_step"),
                    (dict(every_n_steps=1, max_rows_per_step=10, seed=-1), "seed")]:
        with pytest.raises(ValueError, match=msg):
            TokenRecordWriter(tmp_path / "r", **kw)
    with pytest.raises(ValueError, match="out_dir"):
        TokenRecordWriter("", every_n_steps=1, max_rows_per_step=10)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        TokenRecordWriter(tmp_path / "file", every_n_steps=1, max_rows_per_step=10)


def test_disabled_writer_never_touches_tensors_or_disk(tmp_path):
    out = tmp_path / "off"
    for n in (0, -5):
        w = TokenRecordWriter(out, every_n_steps=n, max_rows_per_step=10)
        assert not w.enabled
        # None everywhere: it must return before looking at any argument
        for step in range(4):
            assert w.maybe_write(step, selection=None, response_mask=None, token_ids=None, sequence_ids=None) is None
    assert not out.exists()


def test_every_n_steps_row_cap_whole_sequences_and_values(tmp_path):
    cap = 60
    w = TokenRecordWriter(tmp_path, every_n_steps=3, max_rows_per_step=cap, seed=7)
    batches = {}
    for step in range(8):
        b = make_batch(step, empty_rows=(2,))
        batches[step] = b
        path = write(w, step, b)
        if step % 3:
            assert path is None
            # off-steps return before reading anything
            assert w.maybe_write(step, selection=None, response_mask=None, token_ids=None, sequence_ids=None) is None
        else:
            assert path == record_path(tmp_path, step) and path.name == f"tokens_step{step:06d}.parquet"
    assert sorted(p.name for p in tmp_path.glob("tokens_step*.parquet")) == [
        "tokens_step000000.parquet", "tokens_step000003.parquet", "tokens_step000006.parquet"]

    df = read_records(tmp_path)
    assert tuple(df.columns) == COLUMNS
    assert sorted(df["step"].unique()) == [0, 3, 6]
    for step, part in df.groupby("step"):
        sel, mask, y, ids, _ = batches[step]
        assert 0 < len(part) <= cap
        lengths = mask.sum(1)
        chosen = set(part["sequence_id"])
        for sid, rows in part.groupby("sequence_id"):
            r = ids.index(sid)
            pos = rows["position"].to_numpy()
            # whole sequence, only valid positions, in order
            assert pos.tolist() == torch.nonzero(mask[r]).flatten().tolist()
            t = torch.tensor(pos.tolist(), dtype=torch.long)
            assert rows["token_id"].tolist() == y[r, t].tolist()
            for col, ten in (("entropy", sel.entropy), ("divergence", sel.divergence), ("score", sel.scores),
                             ("forward_divergence", sel.forward_divergence)):
                np.testing.assert_array_equal(rows[col].to_numpy(np.float32), ten[r, t].numpy())
            assert rows["kept"].tolist() == sel.keep_mask[r, t].tolist()
            assert rows["quadrant"].tolist() == sel.quadrants[r, t].tolist()
        assert set(part["quadrant"]) <= {1, 2, 3, 4}
        # greedy fill: every sequence left out would not have fitted in the remaining budget
        left = cap - len(part)
        for r, sid in enumerate(ids):
            if sid not in chosen and int(lengths[r]) > 0:
                assert int(lengths[r]) > left
        assert ids[2] not in chosen  # empty row never written
        for col in TOP_COLUMNS:
            assert part[col].isna().all()


def test_sampling_is_seeded_by_seed_plus_step(tmp_path):
    b = make_batch(3, batch=16)
    seqs = {}
    for name, seed, step in (("a", 1, 4), ("b", 1, 4), ("c", 2, 3), ("d", 9, 4)):
        w = TokenRecordWriter(tmp_path / name, every_n_steps=1, max_rows_per_step=40, seed=seed)
        write(w, step, b)
        seqs[name] = read_records(tmp_path / name)["sequence_id"].tolist()
    assert seqs["a"] == seqs["b"]
    assert seqs["a"] == seqs["c"]  # 1 + 4 == 2 + 3
    assert seqs["a"] != seqs["d"]


def test_sequence_longer_than_cap_is_cut_to_the_cap(tmp_path):
    b = make_batch(5, batch=4, seq=40, full=True)  # every row is 40 tokens, more than the cap
    w = TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=7)
    write(w, 0, b)
    df = read_records(tmp_path)
    assert len(df) == 7 and df["sequence_id"].nunique() == 1
    assert df["position"].tolist() == list(range(7))


def test_quadrant_shares_csv_and_thresholds_json_cover_all_tokens(tmp_path):
    w = TokenRecordWriter(tmp_path, every_n_steps=2, max_rows_per_step=25)
    batches = {s: make_batch(10 + s, batch=12) for s in (0, 2, 4)}
    for s, b in batches.items():
        write(w, s, b)
    shares = read_quadrant_shares(tmp_path)
    assert shares["step"].tolist() == [0, 2, 4]
    with open(tmp_path / "quadrant_shares.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 3
    thresholds = read_thresholds(tmp_path)
    assert json.loads((tmp_path / "thresholds.json").read_text())["steps"].keys() == {"0", "2", "4"}
    for (s, b), row in zip(batches.items(), raw):
        sel, mask = b[0], b[1]
        expected = quadrant_stats(sel.quadrants, sel.divergence, mask, sel.keep_mask)  # ALL tokens
        assert int(row["step"]) == s
        assert int(row["valid_count"]) == int(mask.sum()) and int(row["kept_count"]) == int(sel.keep_mask.sum())
        for key, value in expected.items():
            assert float(row[key]) == value, key
        # the sample is smaller than the batch, so the exact shares are not the sample's
        assert len(read_records(tmp_path, steps=[s])) <= 25 < int(mask.sum())
        te, td = resolve_thresholds(sel.entropy, sel.divergence, mask, **{k: THR[k] for k in
                                    ("entropy_threshold", "divergence_threshold", "threshold_mode")})
        assert thresholds[s]["entropy"] == te and thresholds[s]["divergence"] == td
        assert thresholds[s]["threshold_mode"] == "quantile" and thresholds[s]["entropy_threshold"] == 0.5
        # the thresholds reproduce the selection's quadrants
        h, d = sel.entropy[mask], sel.divergence[mask]
        assert (1 + 2 * (h <= te).long() + (d <= td).long()).tolist() == sel.quadrants[mask].tolist()


def test_rewritten_step_after_resume_keeps_the_last_row(tmp_path):
    w = TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=20)
    write(w, 0, make_batch(1))
    write(w, 1, make_batch(2))
    second = make_batch(3)
    write(TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=20), 1, second)  # a resumed run
    shares = read_quadrant_shares(tmp_path)
    assert shares["step"].tolist() == [0, 1]
    sel, mask = second[0], second[1]
    assert shares.iloc[1]["q3_share"] == quadrant_stats(sel.quadrants, sel.divergence, mask)["q3_share"]
    assert set(read_records(tmp_path, steps=[1])["sequence_id"]) <= set(second[3])


def test_thresholds_and_shares_are_the_selections_own(tmp_path):
    """The writer records what select_for_batch computed (TIPSelection.thresholds / .quadrant_stats)."""
    cfg = TIPConfig(method="entropy", ratio=0.3, entropy_threshold=0.7, divergence_threshold=1.5,
                    threshold_mode="absolute")
    b = make_batch(1, config=cfg)
    sel = b[0]
    assert sel.thresholds == {"entropy": pytest.approx(0.7), "divergence": 1.5, "threshold_mode": "absolute",
                              "entropy_threshold": 0.7, "divergence_threshold": 1.5}
    assert sel.quadrant_stats == quadrant_stats(sel.quadrants, sel.divergence, b[1], sel.keep_mask)
    assert {f"tip/{k}": v for k, v in sel.quadrant_stats.items()}.items() <= sel.metrics.items()
    w = TokenRecordWriter(tmp_path / "ok", every_n_steps=1, max_rows_per_step=50)
    write(w, 0, b)
    assert read_thresholds(tmp_path / "ok")[0] == {"entropy": pytest.approx(0.7), "divergence": 1.5,
                                                   "threshold_mode": "absolute", "entropy_threshold": 0.7,
                                                   "divergence_threshold": 1.5}
    assert read_quadrant_shares(tmp_path / "ok").iloc[0]["q3_share"] == sel.quadrant_stats["q3_share"]
    partial = dataclasses.replace(sel, thresholds={"entropy": 0.5})
    with pytest.raises(TypeError, match="selection.thresholds must be a dict with keys"):
        write(w, 1, (partial, *b[1:]))


def test_top1_columns_round_trip_and_input_validation(tmp_path):
    sel, mask, y, ids, (ls, lt) = b = make_batch(4)
    sp, sid = ls.exp().max(-1)
    tp, tid = lt.exp().max(-1)
    extra = dict(student_top_id=sid, student_top_prob=sp, teacher_top_id=tid, teacher_top_prob=tp)
    w = TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=1000)
    write(w, 0, b, extra=extra)
    table = pq.read_table(record_path(tmp_path, 0))
    assert table.schema.field("student_top_id").type == "int64"
    df = read_records(tmp_path)
    assert len(df) == int(mask.sum())  # everything fits: all sequences written
    for _, rows in df.groupby("sequence_id"):
        r = ids.index(rows["sequence_id"].iloc[0])
        t = torch.tensor(rows["position"].tolist(), dtype=torch.long)
        assert rows["student_top_id"].tolist() == sid[r, t].tolist()
        assert rows["teacher_top_id"].tolist() == tid[r, t].tolist()
        np.testing.assert_array_equal(rows["teacher_top_prob"].to_numpy(np.float32), tp[r, t].numpy())
    write(w, 1, b, extra=dict(teacher_top_id=tid, student_top_id=None, teacher_top_prob=tp.bfloat16()))
    one = read_records(tmp_path, steps=[1])
    assert one["teacher_top_id"].notna().all() and one["student_top_id"].isna().all()
    assert one["student_top_prob"].isna().all()
    rows_of = [ids.index(x) for x in one["sequence_id"]]
    assert one["teacher_top_prob"].tolist() == [float(tp.bfloat16()[r, p]) for r, p in zip(rows_of, one["position"])]
    with pytest.raises(ValueError, match="unknown columns"):
        write(w, 2, b, extra=dict(top5=tid))
    with pytest.raises(ValueError, match="student_top_prob has shape"):
        write(w, 2, b, extra=dict(student_top_prob=sp[:, :3]))
    with pytest.raises(ValueError, match="sequence_ids has 3 ids"):
        w.maybe_write(2, selection=sel, response_mask=mask, token_ids=y, sequence_ids=ids[:3])
    with pytest.raises(ValueError, match="token_id has shape"):
        w.maybe_write(2, selection=sel, response_mask=mask, token_ids=y[:2], sequence_ids=ids)
    with pytest.raises(TypeError, match="selection.keep_mask"):
        w.maybe_write(2, selection=object(), response_mask=mask, token_ids=y, sequence_ids=ids)
    with pytest.raises(ValueError, match="step"):
        w.maybe_write(-1, selection=sel, response_mask=mask, token_ids=y, sequence_ids=ids)
    assert not record_path(tmp_path, 2).exists()


def test_batch_without_valid_tokens_writes_an_empty_sample(tmp_path):
    b = make_batch(2, batch=3, empty_rows=(0, 1, 2))
    w = TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=10)
    assert write(w, 0, b).exists()
    df = read_records(tmp_path)
    assert len(df) == 0 and tuple(df.columns) == COLUMNS
    row = read_quadrant_shares(tmp_path).iloc[0]
    assert row["valid_count"] == 0 and row["q1_share"] == 0.0


def test_read_records_errors_name_the_directory(tmp_path):
    for d in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError, match="tokens_step") as err:
            read_records(d)
        assert str(d) in str(err.value)
    (tmp_path / "tokens_step000001.parquet.tmp").write_text("half-written")  # not a records file
    with pytest.raises(FileNotFoundError, match="no records file"):
        read_records(tmp_path)
    w = TokenRecordWriter(tmp_path, every_n_steps=1, max_rows_per_step=10)
    write(w, 1, make_batch(0))
    with pytest.raises(FileNotFoundError, match=r"step\(s\) \[5\].*recorded steps: 1"):
        read_records(tmp_path, steps=[5])
    assert list(read_records(tmp_path, columns=["step", "kept"]).columns) == ["step", "kept"]


def test_check_writable_dir_names_the_path_and_leaves_nothing_behind(tmp_path):
    check_writable_dir(tmp_path)  # an existing folder
    check_writable_dir(tmp_path / "a" / "b" / "c")  # folders it would create...
    assert list(tmp_path.iterdir()) == []  # ... are removed again, and so is the probe file
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^'.*file' exists and is not a directory$"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(ValueError, match=r"^cannot write to directory '.*file/sub': Not a directory"):
        check_writable_dir(tmp_path / "file" / "sub")
    with pytest.raises(ValueError, match=r"^cannot write to directory '/proc/forbidden/x': No such file or directory "
                                         r"\(/proc/forbidden\)$"):
        check_writable_dir("/proc/forbidden/x")


def test_numpy_integers_are_accepted_by_the_writer(tmp_path):
    w = TokenRecordWriter(tmp_path / "r", every_n_steps=np.int64(2), max_rows_per_step=np.int32(40), seed=np.uint8(1))
    assert (w.every_n_steps, w.max_rows_per_step, w.seed) == (2, 40, 1)
    assert write(w, np.int64(4), make_batch(0)) == record_path(tmp_path / "r", 4)
