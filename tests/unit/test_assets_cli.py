"""`python -m tip_verl.assets`: a user error is one `tip-verl-build-assets: error:` line and exit code 2."""

from tip_verl.assets.cli import main


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tip-verl-build-assets: error: ") and "Traceback" not in err, err
    return lines[0]


def test_unwritable_out_is_one_line_and_exit_2(capsys):
    assert main(["--out", "/proc/forbidden/x", "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("tip-verl-build-assets: error: cannot build the assets in /proc/forbidden/x: "
                    "[Errno 2] No such file or directory: '/proc/forbidden'")


def test_out_holding_other_files_is_one_line_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--out", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot build the assets in {out}" in line and "refusing to replace it" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
