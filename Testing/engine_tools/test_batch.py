"""Cohort segmentation as a user runs it: a folder of real MRI crops (and a corrupt file) through
`medquant segment --output-dir`, resumed, killed, and run on a Dask LocalCluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from engine_helpers import small_card
from shared_data import shared_path

from engine_tools.cache import partial_artifacts
from engine_tools.cli import main
from engine_tools.progress import validate_event

REPO = Path(__file__).resolve().parents[2]
CROP = 40  # whole-volume windows of 40^3: one network pass per scan
MODEL = "brainchop-model5_gw_ae"


def _crop(image: sitk.Image, start: tuple[int, int, int]) -> sitk.Image:
    return sitk.RegionOfInterest(image, [CROP] * 3, list(start))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BIDS-like folder of real T1 crops (two subjects of one head, one of MNI152 as NRRD), a corrupt
    scan and a sidecar file; the small-window card and the weights mirror."""
    root = tmp_path_factory.mktemp("cohort")
    t1 = sitk.ReadImage(str(shared_path("data", "mri", "t1_crop.nii.gz")))
    mni = sitk.ReadImage(str(shared_path("data", "mri", "mni152_2009_t1.nii.gz")))
    inputs = root / "bids"
    for name, image, start, suffix in (
        ("sub-01", t1, (100, 110, 96), ".nii.gz"),
        ("sub-02", t1, (70, 90, 120), ".nii.gz"),
        ("sub-03", mni, (70, 100, 80), ".nrrd"),
    ):
        folder = inputs / name / "anat"
        folder.mkdir(parents=True)
        sitk.WriteImage(_crop(image, start), str(folder / f"{name}_T1w{suffix}"))
        (folder / f"{name}_T1w.json").write_text("{}")
    broken = inputs / "sub-04" / "anat"
    broken.mkdir(parents=True)
    (broken / "sub-04_T1w.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip-compressed NIfTI")
    card = small_card(MODEL, CROP)
    raw = {**card.raw, "preprocessing": {k: v for k, v in card.raw["preprocessing"].items() if k != "shape"}}
    card_file = root / "card.json"
    card_file.write_text(json.dumps(raw))
    return {"inputs": inputs, "card": card_file, "weights": shared_path("models", "brainchop")}


def _segment_args(cohort: dict[str, Path], progress: str, *extra: str) -> list[str]:
    """``medquant segment`` of the cohort's card: FP32 OpenVINO, the shared weights, ``extra`` options."""
    return [
        "segment",
        str(cohort["card"]),
        "--precision",
        "fp32",
        "--backend",
        "openvino",
        "--weights-dir",
        str(cohort["weights"]),
        "--progress",
        progress,
        *extra,
    ]


def _segment(cohort: dict[str, Path], *extra: str, capsys: pytest.CaptureFixture) -> tuple[int, list[dict]]:
    code = main(_segment_args(cohort, "jsonl", *extra))
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return code, events


def _manifest(out: Path) -> dict[str, dict]:
    return {row["scan"]: row for row in json.loads((out / "manifest.json").read_text())["rows"]}


def _labels(path: str | Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


SCANS = ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nrrd")
BROKEN = "sub-04/anat/sub-04_T1w.nii.gz"


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory, session_cache) -> Path:
    """One batch run into a fresh folder (engine cache shared by this module's tests)."""
    out = tmp_path_factory.mktemp("batch") / "out"
    saved = os.environ.get("MEDQUANT_CACHE_DIR")
    os.environ["MEDQUANT_CACHE_DIR"] = str(session_cache)
    try:
        code = _first_run(cohort, out)
    finally:
        os.environ.pop("MEDQUANT_CACHE_DIR")
        if saved is not None:
            os.environ["MEDQUANT_CACHE_DIR"] = saved
    assert code == 0
    return out


def _first_run(cohort: dict[str, Path], out: Path) -> int:
    return main(_segment_args(cohort, "none", "--input", str(cohort["inputs"]), "--output-dir", str(out)))


@pytest.fixture
def cache(session_cache, monkeypatch) -> Path:
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(session_cache))
    return session_cache


def test_batch_matches_single_scan_and_records_the_corrupt_file(cohort, first_run, cache, tmp_path, capsys):
    rows = _manifest(first_run)
    assert set(rows) == {*SCANS, BROKEN}
    assert rows[BROKEN]["status"] == "failed" and BROKEN.split("/")[-1] in rows[BROKEN]["error"]
    for scan in SCANS:
        row = rows[scan]
        assert row["status"] == "done", row
        source = cohort["inputs"] / scan
        assert row["input_sha256"] == __import__("hashlib").sha256(source.read_bytes()).hexdigest()
        assert Path(row["output"]).is_file() and Path(row["label_table"]).is_file()
        assert row["timings"]["inference_s"] > 0 and row["engine_key"]
    expected = first_run / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    assert rows[SCANS[2]]["output"] == str(expected)
    with open(first_run / "manifest.csv") as stream:
        csv_rows = {r["scan"]: r for r in csv.DictReader(stream)}
    assert {s: r["status"] for s, r in csv_rows.items()} == {s: r["status"] for s, r in rows.items()}

    single = tmp_path / "single.nii.gz"
    code, events = _segment(
        cohort, "--input", str(cohort["inputs"] / SCANS[2]), "--output", str(single), capsys=capsys
    )
    assert code == 0, events[-1]
    assert events[-1]["data"]["engine"]["cache"] == "hit"
    by_value = {entry["value"]: entry for entry in events[-1]["data"]["volumes"]}  # for the Slicer table
    single_labels = nib.load(str(single))
    counts = np.bincount(np.asarray(single_labels.dataobj).astype(int).ravel(), minlength=3)
    assert [by_value[v]["voxels"] for v in (0, 1, 2)] == counts[:3].tolist()
    voxel_ml = abs(np.linalg.det(single_labels.affine[:3, :3])) / 1000.0
    assert by_value[2]["volume_ml"] == pytest.approx(counts[2] * voxel_ml, abs=1e-9)
    batch_image, single_image = sitk.ReadImage(str(expected)), sitk.ReadImage(str(single))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(batch_image), sitk.GetArrayFromImage(single_image))
    source = sitk.ReadImage(str(cohort["inputs"] / SCANS[2]))
    assert batch_image.GetSize() == source.GetSize()
    np.testing.assert_allclose(batch_image.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(batch_image.GetOrigin(), source.GetOrigin(), atol=1e-4)


def test_volumes_csv_equals_voxel_counts_times_voxel_volume(first_run, cache):
    rows = _manifest(first_run)
    with open(first_run / "volumes.csv") as stream:
        table = {r["scan"]: r for r in csv.DictReader(stream)}
    assert set(table) == set(SCANS)  # the failed scan has no volumes
    for scan in SCANS:
        image = nib.load(rows[scan]["output"])  # read independently of the tools (nibabel, affine)
        labels = np.asarray(image.dataobj).astype(int)
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000.0
        for value, name in ((1, "White Matter"), (2, "Grey Matter")):
            voxels = int((labels == value).sum())
            assert voxels > 0
            assert int(table[scan][f"{name} voxels"]) == voxels
            assert float(table[scan][f"{name} mL"]) == pytest.approx(voxels * voxel_ml, abs=1e-6)


def test_rerun_skips_what_is_done_and_retries_the_failed(cohort, first_run, cache, capsys):
    before = {s: Path(first_run / s.replace(".nrrd", ".nii.gz")).stat().st_mtime_ns for s in SCANS}
    code, events = _segment(
        cohort, "--input", str(cohort["inputs"]), "--output-dir", str(first_run), capsys=capsys
    )
    assert code == 0, events[-1]
    rows = _manifest(first_run)
    assert {s: rows[s]["status"] for s in SCANS} == dict.fromkeys(SCANS, "skipped")
    assert rows[BROKEN]["status"] == "failed"
    assert events[-1]["data"]["counts"] == {"done": 0, "failed": 1, "skipped": 3}
    after = {s: Path(first_run / s.replace(".nrrd", ".nii.gz")).stat().st_mtime_ns for s in SCANS}
    assert after == before  # nothing rewritten
    # another overlap, or sliding windows where one whole-volume pass would run, is another result
    for extra in (("--overlap", "0.25"), ("--sliding-windows",), ()):
        args = ("--input", str(cohort["inputs"]), "--output-dir", str(first_run), *extra)
        code, events = _segment(cohort, *args, capsys=capsys)
        assert code == 0 and events[-1]["data"]["counts"] == {"done": 3, "failed": 1, "skipped": 0}
        row = _manifest(first_run)[SCANS[0]]
        assert row["window"]["overlap"] == (0.25 if "--overlap" in extra else 0.5)
        assert row["window"]["sliding_windows"] == ("--sliding-windows" in extra)
        assert row["timings"]["mode"] == ("windows" if "--sliding-windows" in extra else "whole_volume")


def test_list_input_and_reference_dice(cohort, first_run, cache, tmp_path, capsys):
    """A .txt list of two scans; references named like the scans give Dice 1 and a computed value."""
    refs = tmp_path / "refs"
    refs.mkdir()
    exact = _labels(first_run / "sub-01/anat/sub-01_T1w.nii.gz")
    reference_01 = sitk.ReadImage(str(first_run / "sub-01/anat/sub-01_T1w.nii.gz"))
    sitk.WriteImage(reference_01, str(refs / "sub-01_T1w_dseg.nii.gz"))
    other = sitk.ReadImage(str(first_run / "sub-02/anat/sub-02_T1w.nii.gz"))
    changed = sitk.GetArrayFromImage(other)
    original = changed.copy()
    changed[: CROP // 2] = 0  # half the slices lose their labels
    altered = sitk.GetImageFromArray(changed)
    altered.CopyInformation(other)
    sitk.WriteImage(altered, str(refs / "sub-02_T1w_dseg.nii.gz"))
    listing = tmp_path / "scans.txt"
    listing.write_text(f"# two subjects\n{cohort['inputs'] / SCANS[0]}\n{cohort['inputs'] / SCANS[1]}\n")
    out = tmp_path / "out"
    code, events = _segment(
        cohort,
        "--input",
        str(listing),
        "--output-dir",
        str(out),
        "--reference",
        str(refs / "{stem}_dseg.nii.gz"),
        capsys=capsys,
    )
    assert code == 0, events[-1]
    with open(out / "volumes.csv") as stream:
        table = {r["scan"]: r for r in csv.DictReader(stream)}
    assert set(table) == {"sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"}
    assert float(table["sub-01/anat/sub-01_T1w.nii.gz"]["Grey Matter Dice"]) == 1.0
    assert np.array_equal(_labels(out / "sub-01/anat/sub-01_T1w.nii.gz"), exact)
    ours = original == 2
    theirs = changed == 2
    expected = 2 * (ours & theirs).sum() / (ours.sum() + theirs.sum())
    assert float(table["sub-02/anat/sub-02_T1w.nii.gz"]["Grey Matter Dice"]) == pytest.approx(expected)


def test_a_reference_pattern_with_an_unknown_placeholder_fails_before_any_work(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("--input", str(cohort["inputs"]), "--output-dir", str(out), "--reference", "{subject}.nii.gz")
    code, events = _segment(cohort, *args, capsys=capsys)
    assert code == 1 and "{stem}" in events[-1]["message"] and not out.exists()


def test_refuses_a_folder_that_is_not_a_batch_output(cohort, cache, tmp_path, capsys):
    out = tmp_path / "theirs"
    target = out / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    target.parent.mkdir(parents=True)
    target.write_text("a user's file")
    code, events = _segment(cohort, "--input", str(cohort["inputs"]), "--output-dir", str(out), capsys=capsys)
    assert code == 1 and events[-1]["error_type"] == "FileExistsError"
    assert target.read_text() == "a user's file"


def _cli(*args: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "MEDQUANT_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "engine_tools", *args, "--progress", "jsonl"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_sigkill_mid_batch_then_rerun_finishes_the_rest(cohort, first_run, cache, tmp_path):
    out = tmp_path / "killed"
    common = ["segment", str(cohort["card"]), "--precision", "fp32", "--backend", "openvino"]
    common += ["--weights-dir", str(cohort["weights"]), "--input", str(cohort["inputs"])]
    proc = _cli(*common, "--output-dir", str(out), cache=cache)
    for line in proc.stdout:  # kill right after the first scan is segmented, while the next one runs
        event = json.loads(line)
        if event["event"] == "progress" and event["stage"] == "batch":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = {s for s, r in _manifest(out).items() if r["status"] == "done"}
    assert 1 <= len(done_before) < len(SCANS)
    rerun = _cli(*common, "--output-dir", str(out), cache=cache)
    events = [json.loads(line) for line in rerun.stdout]
    assert rerun.wait(timeout=600) == 0, events[-1]
    for event in events:
        validate_event(event)
    batch_events = [e for e in events if e["event"] == "progress" and e["stage"] == "batch"]
    assert batch_events[-1]["fraction"] == 1.0 and "ETA" in batch_events[-1]["message"]
    rows = _manifest(out)
    assert {s for s in SCANS if rows[s]["status"] == "skipped"} == done_before
    assert all(rows[s]["status"] in ("done", "skipped") for s in SCANS)
    assert partial_artifacts(out) == []
    for scan in SCANS:
        np.testing.assert_array_equal(
            _labels(rows[scan]["output"]), _labels(_manifest(first_run)[scan]["output"])
        )


def test_dask_local_cluster_gives_the_same_labels_and_rows(cohort, first_run, cache, tmp_path, capsys):
    import dask.distributed  # noqa: F401  (the [cluster] extra, part of the [test] install)

    out = tmp_path / "dask"
    started = time.perf_counter()
    code, events = _segment(
        cohort,
        "--input",
        str(cohort["inputs"]),
        "--output-dir",
        str(out),
        "--cluster",
        "local:2",
        capsys=capsys,
    )
    assert code == 0, events[-1]
    assert events[-1]["data"]["executor"] == "dask" and time.perf_counter() - started < 600
    relayed = [e for e in events if e["event"] == "progress" and e["stage"] == "segment"]
    assert {e["message"].split(" on tcp://")[0] for e in relayed} >= {f"[{scan}" for scan in SCANS}
    local, distributed = _manifest(first_run), _manifest(out)
    assert set(distributed) == set(local)
    workers = {distributed[s]["worker"] for s in SCANS}
    assert all(w.startswith("tcp://") for w in workers)
    same = {"skipped": "done"}  # the local folder may have been re-run (skipped) by now
    for scan in (*SCANS, BROKEN):
        status = distributed[scan]["status"]
        assert same.get(status, status) == same.get(local[scan]["status"], local[scan]["status"])
        for key in ("input", "input_sha256", "engine_key", "volumes"):
            assert distributed[scan].get(key) == local[scan].get(key), (scan, key)
    for scan in SCANS:
        np.testing.assert_array_equal(_labels(distributed[scan]["output"]), _labels(local[scan]["output"]))


def test_collect_scans_from_a_dicom_folder_and_a_csv_list(tmp_path):
    """Output names mirror the inputs' relative paths; a DICOM series folder becomes one scan whose
    hash covers all its files; a CSV list is read from its 'path' column; OUT is never searched."""
    from engine_tools.batch import collect_scans, hash_scan

    dicom = shared_path("data", "ct", "example_ct_dicom")
    inputs = tmp_path / "in"
    (inputs / "sub-05").mkdir(parents=True)
    (inputs / "sub-05" / "dicom").symlink_to(dicom, target_is_directory=True)
    nifti = inputs / "sub-06" / "ct.nii.gz"
    nifti.parent.mkdir()
    nifti.write_bytes((shared_path("data", "ct", "example_ct_sm.nii.gz")).read_bytes())
    out = inputs / "labels"  # an output folder inside the input folder
    (out / "sub-06").mkdir(parents=True)
    (out / "sub-06" / "ct.nii.gz").write_bytes(nifti.read_bytes())
    scans, _ = collect_scans(inputs, out)
    assert [(s.scan, Path(s.output).relative_to(out).as_posix()) for s in scans] == [
        ("sub-05/dicom/", "sub-05/dicom.nii.gz"),
        ("sub-06/ct.nii.gz", "sub-06/ct.nii.gz"),
    ]
    assert len(scans[0].files) == len(list(dicom.iterdir())) > 1
    assert hash_scan(scans[0]) != hash_scan(scans[1])
    listing = tmp_path / "list.csv"
    listing.write_text(
        f"subject,path\nA,{nifti}\nB,{inputs / 'sub-05' / 'dicom'}\nC,{tmp_path / 'gone.nii'}\n"
        f"D,{out / 'sub-06' / 'ct.nii.gz'}\n"
    )
    listed, warned = collect_scans(listing, out)
    assert sorted(s.scan for s in listed) == ["sub-05/dicom/", "sub-06/ct.nii.gz"]
    assert any("gone.nii" in w for w in warned)
    assert any("inside --output-dir" in w for w in warned)  # an output is never an input


def test_a_second_batch_on_the_same_folder_is_refused_while_one_runs(cohort, cache, tmp_path, capsys):
    from filelock import FileLock

    from engine_tools.batch_run import LOCK_FILE

    out = tmp_path / "busy"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)):  # what a running batch holds
        code, events = _segment(
            cohort, "--input", str(cohort["inputs"]), "--output-dir", str(out), capsys=capsys
        )
    assert code == 1 and "another batch" in events[-1]["message"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_scheduler_address_runs_on_an_existing_dask_cluster(cohort, first_run, cache, tmp_path, capsys):
    from dask.distributed import LocalCluster

    listing = tmp_path / "one.txt"
    listing.write_text(f"{cohort['inputs'] / SCANS[2]}\n")
    out = tmp_path / "remote"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        code, events = _segment(
            cohort,
            "--input",
            str(listing),
            "--output-dir",
            str(out),
            "--scheduler",
            cluster.scheduler_address,
            capsys=capsys,
        )
        workers = set(cluster.scheduler_info["workers"])
    assert code == 0, events[-1]
    row = _manifest(out)["sub-03_T1w.nrrd"]
    assert row["status"] == "done" and row["worker"] in workers
    np.testing.assert_array_equal(_labels(row["output"]), _labels(_manifest(first_run)[SCANS[2]]["output"]))
