"""The command line end to end on a small benchmark, including a bad file in the batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vitsem.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["data", "make"], ["train"], ["sift"], ["analyze"],
                                 ["audit"], ["pretrain"]])
def test_help(cmd: list[str]) -> None:
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_data_make(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "make", "--out", str(tmp_path / "d"), "--n-train", "8",
                                 "--n-test", "4", "--glyph", "text"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d" / "images").rglob("*.png"))) == 12
    bad = runner.invoke(app, ["data", "make", "--out", str(tmp_path / "e"), "--rho", "2"])
    assert bad.exit_code == 2 and "rho" in bad.output


def test_analyze_and_sift_with_a_bad_file(small_dataset: Path, small_checkpoint: Path,
                                          tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((small_dataset / "images" / "test").glob("*.png"))[:10]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(folder), "--checkpoint", str(small_checkpoint),
                                 "--out", str(out), "--batch-size", "4", "--examples", "2",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "semantic layer profile" in result.output
    doc = json.loads((out / "stats.json").read_text())
    assert doc["num_images"] == 10 and doc["num_rejected"] == 1
    assert len(doc["layer_profile"]) == 2
    lift = doc["statistics"]["semantic_lift"]
    assert lift["shape"] == [2, 3]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rejected] == ["broken.png"]
    assert pq.read_table(out / "per_image.parquet").num_rows == 10
    for name in ("layer_profile.png", "level_matrix.png", "attention_00.png", "attention_01.png"):
        assert (out / name).stat().st_size > 1000

    sift_out = tmp_path / "sift"
    result = runner.invoke(app, ["sift", str(folder), "--checkpoint", str(small_checkpoint),
                                 "--out", str(sift_out), "--weighting", "scale"])
    assert result.exit_code == 0, result.output
    kp = pq.read_table(sift_out / "keypoints.parquet")
    imgs = pq.read_table(sift_out / "images.parquet").to_pylist()
    assert len(imgs) == 10 and kp.num_rows == sum(r["num_keypoints"] for r in imgs)
    assert "broken.png" in (sift_out / "rejected.jsonl").read_text()


def test_clear_errors(tmp_path: Path, small_checkpoint: Path) -> None:
    result = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "--checkpoint",
                                 str(small_checkpoint)])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(app, ["analyze", str(tmp_path), "--model", "vit_tinny"])
    assert result.exit_code == 2 and "unknown model" in result.output


@pytest.mark.parametrize(("args", "says"), [
    (["audit", "{data}", "--checkpoint", "{ckpt}", "--top-fraction", "2"], "top_fraction"),
    (["analyze", "{data}", "--checkpoint", "{ckpt}", "--levels", "1"], "levels must be in"),
    (["analyze", "{data}", "--checkpoint", "{ckpt}", "--batch-size", "0"], "batch_size"),
    (["analyze", "{data}", "--checkpoint", "{ckpt}", "--weighting", "votes"], "votes"),
    (["pretrain", "{data}", "--mask-ratio", "1.5"], "mask_ratio"),
    (["pretrain", "{data}", "--masker", "everything"], "masker"),
])
def test_bad_option_values_are_one_line_and_exit_2(args: list[str], says: str,
                                                     small_dataset: Path,
                                                     small_checkpoint: Path) -> None:
    argv = [a.format(data=small_dataset, ckpt=small_checkpoint) for a in args]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_runner_options_reach_the_flow_as_its_runner_parameter(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--runner` / `--dask-address` choose the task runner per run, as a deployment's
    `runner` parameter does; a contradictory pair is refused before any work."""
    import flows.spurious_audit as audit_flow
    from flows.runners import RunnerParams

    seen: list[RunnerParams | None] = []

    def stop_here(params: object, runner: RunnerParams | None = None) -> None:
        seen.append(runner)
        raise SystemExit(0)

    monkeypatch.setattr(audit_flow, "spurious_audit", stop_here)
    data = tmp_path / "d"
    assert runner.invoke(app, ["data", "make", "--out", str(data), "--n-train", "8",
                               "--n-test", "8"]).exit_code == 0
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"")  # never read: the flow is replaced
    base = ["audit", str(data), "--checkpoint", str(ckpt)]
    for extra, want in [([], None),
                        (["--runner", "dask"], RunnerParams(kind="dask")),
                        (["--dask-address", "tcp://10.0.0.5:8786"],
                         RunnerParams(kind="dask", address="tcp://10.0.0.5:8786")),
                        (["--runner", "thread"], RunnerParams(kind="thread"))]:
        seen.clear()
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert seen == [want]
    seen.clear()
    bad = runner.invoke(app, [*base, "--runner", "thread", "--dask-address", "tcp://h:8786"])
    assert bad.exit_code != 0 and "--dask-address needs --runner dask" in bad.output
    assert seen == []
    wrong = runner.invoke(app, [*base, "--runner", "mpi"])
    assert wrong.exit_code != 0 and "mpi" in wrong.output
