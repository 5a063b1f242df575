"""The data the default commands read is shipped inside the package, intact, and found with nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qadapter.data import BUNDLED_DATA, data_file, default_data_dir, read_records
from qadapter.errors import DataError
from qadapter.eval.benchmarks import LOADERS, load_benchmark

FULL_SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "boolq": 3270, "mmlu": 14042, "gsm8k": 1319}


def test_shipped_files_match_their_checksums():
    lines = (BUNDLED_DATA / "SHA256SUMS").read_text().splitlines()
    assert len(lines) > 10
    for line in lines:
        expected, name = line.split(maxsplit=1)
        assert hashlib.sha256((BUNDLED_DATA / name).read_bytes()).hexdigest() == expected, name
    listed = {Path(line.split(maxsplit=1)[1]).as_posix().removeprefix("./") for line in lines}
    shipped = {p.relative_to(BUNDLED_DATA).as_posix() for p in BUNDLED_DATA.rglob("*") if p.is_file() and p.suffix != ".md" and p.name != "SHA256SUMS"}
    assert shipped == listed  # nothing shipped unchecked, nothing listed missing


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_benchmark_loads_in_full_from_the_shipped_data(name):
    assert len(load_benchmark(name, BUNDLED_DATA)) == FULL_SIZES[name]


def test_default_data_and_replay_prompts_are_shipped():
    dsp = read_records(data_file(BUNDLED_DATA, "dsp/domain_specific_preference.json"), prefer="academy")
    assert len(dsp.records) > 1900  # 500 queries × 4 rival styles, less the few identical answers DSP holds
    for subset in ("helpful-base", "harmless-base"):
        assert len(read_records(data_file(BUNDLED_DATA, f"hh-rlhf/{subset}/test.jsonl.gz"), skip_invalid=True).records) > 2000


def test_default_data_dir_is_the_package_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("QADAPTER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # a ../shared beside the working folder must play no part
    assert default_data_dir() == BUNDLED_DATA
    monkeypatch.setenv("QADAPTER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("QADAPTER_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="QADAPTER_DATA_DIR=.*missing: not a folder"):
        default_data_dir()


def test_data_file_prefers_the_plain_file_and_names_what_is_missing(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"")
    assert data_file(tmp_path, "a.jsonl") == tmp_path / "a.jsonl.gz"
    (tmp_path / "a.jsonl").write_text("")
    assert data_file(tmp_path, "a.jsonl") == tmp_path / "a.jsonl"
    with pytest.raises(DataError, match=r"b\.jsonl: data file not found"):
        data_file(tmp_path, "b.jsonl")


def test_main_job_path_runs_in_a_clone_without_shared_data(tiny_model_dir, tmp_path):
    """`qadapter train` with no --data, as `make demo` runs it, from a folder with no ../shared and no
    QADAPTER_DATA_DIR: the shipped DSP file is read, split, trained on and evaluated (tiny model)."""
    work = tmp_path / "clone"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "QADAPTER_DATA_DIR"} | {"OMP_NUM_THREADS": "1"}
    args = ["train", "--model", str(tiny_model_dir), "--output", "run", "--max-steps", "2", "--max-train-pairs", "8", "--max-eval-pairs", "8"]
    done = subprocess.run([sys.executable, "-m", "qadapter", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["prefer"] == "academy" and metrics["data"] == "dsp/domain_specific_preference.json"
    assert metrics["steps"] == 2 and metrics["pref_accuracy_after"] is not None
