"""`edsr-dist bench`: a tiny configuration end to end (structure and sanity of the report, not speed),
the step breakdown arithmetic, and bad flags."""

import json

import pytest
from helpers import run_cli

from edsr_dist.perf.train_speed import PHASES, format_report

# Its tests share an expensive module fixture: one xdist worker runs them all (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("bench")

TINY_BENCH = ["bench", "--preset", "sample", "--num-blocks", "2", "--num-filters", "8", "--batch-size", "4",
              "--patch-size", "16", "--steps", "3", "--warmup", "1", "--precision", "fp32", "--threads", "2",
              "--store-seconds", "0.2"]


@pytest.fixture(scope="module")
def tiny_report(sample_store, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bench_cwd")
    result = run_cli(TINY_BENCH + ["--compare-fp32", "--compare-nproc", "2", "--block-steps", "1", "--json",
                                   "--data", str(sample_store)], cwd=cwd)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one JSON object, nothing else on stdout
    assert list(cwd.iterdir()) == []  # the bench leaves no run folder behind where it was started
    return json.loads(lines[0])


def test_json_has_the_promised_keys(tiny_report):
    for key in ("images_per_s", "tflops", "bare_images_per_s", "overhead_ratio", "data_wait_fraction",
                "allreduce_fraction", "fp32_nchw_images_per_s", "scaling_efficiency", "store_patches_per_s",
                "settings", "machine", "breakdown_ms", "breakdown_fraction", "checks"):
        assert key in tiny_report, key
    machine = tiny_report["machine"]
    for key in ("cpu_model", "cpus", "torch", "device", "device_name"):
        assert machine[key], key
    settings = tiny_report["settings"]
    assert (settings["preset"], settings["batch_size"], settings["patch_size"], settings["precision"]) == \
        ("sample", 4, 16, "fp32")
    assert (settings["num_blocks"], settings["num_filters"], settings["threads"]) == (2, 8, 2)


def test_json_figures_are_sane(tiny_report):
    r = tiny_report
    for key in ("images_per_s", "tflops", "bare_images_per_s", "fp32_nchw_images_per_s", "store_patches_per_s",
                "step_time_ms"):
        assert r[key] > 0, key
    # Ratios of the same work measured twice: near 1 on a quiet machine; on a loaded one (several test runs on
    # 2 cores) a 3-step measurement can be starved 50x, so only units or bookkeeping gone wrong fail here.
    for key in ("overhead_ratio", "precision_speedup", "scaling_efficiency"):
        assert 0.005 < r[key] < 200, key
    assert 0 <= r["data_wait_fraction"] <= 1 and 0 <= r["allreduce_fraction"] <= 1
    assert set(r["breakdown_fraction"]) == set(PHASES)
    assert sum(r["breakdown_fraction"].values()) == pytest.approx(1.0)
    # The phases split the timed steps: their mean adds up to the mean step, which is near the median.
    assert sum(r["breakdown_ms"].values()) == pytest.approx(r["trainer"]["mean_step_s"] * 1e3, rel=1e-6)
    assert r["breakdown_fraction"]["forward_backward"] > 0.1
    assert r["tflops"] == pytest.approx(r["images_per_s"] * r["train_flops_per_image"] / 1e12)
    assert r["trainer"]["world_size"] == 1 and r["trainer"]["threads"] == 2
    scaling = r["scaling"]
    assert (scaling["one_worker"]["world_size"], scaling["one_worker"]["threads"]) == (1, 2)
    assert (scaling["n_workers"]["world_size"], scaling["n_workers"]["threads"]) == (2, 1)
    assert len(r["trainer"]["step_times_s"]) == 3
    assert set(r["checks"]) == {"overhead_ratio", "precision_speedup", "scaling_efficiency", "data_wait_fraction"}
    # One repeat of each measurement: the bare loop, the trainer, fp32 NCHW, and the 2-worker trainer.
    assert {name: len(values) for name, values in r["repeats_images_per_s"].items()} == \
        {"bare": 1, "trainer": 1, "fp32_nchw": 1, "workers_2": 1}


def test_trainer_and_bare_loop_alternate_in_blocks(tiny_report):
    """One trainer step, then one bare step, three times (--steps 3 --block-steps 1): each pair gives a ratio, and
    trainer / bare is their median, with the spread."""
    r, trainer = tiny_report, tiny_report["trainer"]
    assert trainer["block_steps"] == 1 and len(trainer["bare_block_s"]) == 3
    assert trainer["trainer_block_s"] == pytest.approx(trainer["step_times_s"])
    assert trainer["block_ratios"] == pytest.approx([b / t for b, t in zip(trainer["bare_block_s"],
                                                                            trainer["trainer_block_s"])])
    spread = r["overhead_ratio_spread"]
    assert spread["pairs"] == 3 and spread["method"] == "interleaved blocks, one process"
    ordered = sorted(trainer["block_ratios"])
    assert (spread["min"], spread["median"], spread["max"]) == pytest.approx(tuple(ordered))
    assert r["overhead_ratio"] == pytest.approx(ordered[1])
    assert spread["min"] <= spread["p25"] <= spread["median"] <= spread["p75"] <= spread["max"]
    # Three pairs are too few for a 95% interval of the median: it is the whole range.
    assert (spread["median_low"], spread["median_high"], spread["confidence"]) == (ordered[0], ordered[2], 0.95)
    check = r["checks"]["overhead_ratio"]
    assert check["target"] == ">= 0.97"
    assert check["decided"] == (spread["median_low"] >= 0.97 or spread["median_high"] < 0.97)
    # A bare block runs between trainer steps, so it is not inside any trainer step's time.
    assert all(t > 0 for t in trainer["step_times_s"]) and all(b > 0 for b in trainer["bare_block_s"])

    undecided = {**r, "checks": {**r["checks"], "overhead_ratio": {**check, "decided": False}}}
    assert "not decided" in format_report(undecided)
    assert "adjacent pairs of 1-step blocks" in format_report(r)


def test_table_names_every_figure(tiny_report):
    table = format_report(tiny_report)
    for text in ("img/s", "TFLOP/s", "trainer (1 worker x 2 thread(s))", "bare loop", "fp32 NCHW",
                 "2 worker(s) x 1 thread(s)", "store, 1 reader", "data wait", "forward + backward",
                 "all-reduce wait", "optimizer", "trainer / bare loop"):
        assert text in table, text


@pytest.mark.parametrize("flags, mentions", [
    (["--steps", "0"], "--steps"),
    (["--warmup", "0"], "--warmup"),
    (["--repeat", "0"], "--repeat"),
    (["--steps", "3", "--block-steps", "4"], "--block-steps 4"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--precision", "fp64"], "--precision"),
    (["--compare-nproc", "1"], "--compare-nproc"),
    (["--batch-size", "2", "--compare-nproc", "3"], "--compare-nproc 3"),
    (["--accumulate", "0"], "--accumulate"),
    (["--accumulate", "2", "--compare-accumulate", "2"], "--compare-accumulate"),
    (["--batch-size", "4", "--nproc", "2", "--compare-accumulate", "4"], "x --accumulate 4"),
    (["--preset", "nope"], "nope"),
    (["--data", "/nonexistent/store.h5"], "/nonexistent/store.h5"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, flags, mentions):
    result = run_cli(["bench", *flags], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edsr-dist bench: error:"), result.stderr
    assert mentions in lines[0]


def test_repeats_run_the_trainer_again(sample_store, tmp_path):
    # Each repeat trains anew, in a folder of its own (a run folder holds one run).
    result = run_cli(TINY_BENCH + ["--repeat", "2", "--steps", "2", "--json", "--data", str(sample_store)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    repeats = json.loads(result.stdout)["repeats_images_per_s"]
    assert {name: len(values) for name, values in repeats.items()} == {"bare": 2, "trainer": 2}


def test_accumulation_sends_one_all_reduce_per_step_and_an_uneven_split_is_named(sample_store, tmp_path):
    """2 workers, accumulate 1 against 2: the same number of gradient buckets is all-reduced per optimizer step
    (the first micro-step runs under DDP's no_sync); and 3 workers take the batch of 4 as 2/1/1."""
    result = run_cli(TINY_BENCH + ["--nproc", "2", "--compare-accumulate", "2", "--json", "--data", str(sample_store)],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    base, other = report["accumulation"]["base"], report["accumulation"]["other"]
    assert (base["accumulate"], other["accumulate"]) == (1, 2)
    assert base["allreduce_buckets_per_step"] >= 1
    assert other["allreduce_buckets_per_step"] == base["allreduce_buckets_per_step"]
    assert report["accumulation"]["ratio"] > 0
    table = format_report({**report, "settings": {**report["settings"], "nproc": 3, "split": "2/1/1"}})
    assert "trainer (3 workers x 1 thread(s), 2/1/1)" in table
    assert "trainer, accumulate 2" in table and "gradient buckets all-reduced per step" in table
