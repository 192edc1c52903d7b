"""personalize-many on the shipped toy bundle: a local pool, a real local Ray instance, faults.

Every run is compared with plain `zoodip-edge personalize` runs of the same options: the
embeddings must be equal bit for bit (CPU EP), also after a killed worker or driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zoodip_edge.many import personalize_many, profile_with_threads, read_jsonl
from zoodip_edge.toy import shipped_path
from zoodip_edge.toy.world import concept_photos

pytestmark = pytest.mark.slow  # subprocess pools, Ray, killed workers

BUNDLE = str(shipped_path("bundle"))
STEPS = 30  # a few seconds a job: enough for a checkpoint and a changed token
LONG = 150  # the job a test kills: long enough to be caught between checkpoints
ENV = dict(os.environ)


def cli(*argv: str, check: int | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "zoodip_edge.cli", *argv], capture_output=True, text=True, env=ENV)
    if check is not None:
        assert r.returncode == check, r.stderr
    return r


def tensor(path: Path) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.get_tensor(next(iter(f.keys())))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Photos of two toy concepts and a job file: a grid of 2 seeds, 2 more jobs, 2 bad ones."""
    root = tmp_path_factory.mktemp("many")
    for concept in ("purple-ring", "green-triangle"):
        color, shape = concept.split("-")
        concept_photos(root / concept, color, shape, count=5, seed=0)
    common = {"bundle": BUNDLE, "init": "shape", "steps": STEPS, "checkpoint_every": 5}
    lines = [
        {"name": "ring", "images": "purple-ring", "token": "<ring>", "concept": "purple-ring", "grid": {"seed": [0, 1]}},
        {"name": "tri", "images": "green-triangle", "token": "<tri>", "lr": 0.03, "concept": "green-triangle"},
        {"name": "tri-seq", "images": "green-triangle", "token": "<tri>", "batched": False, "seed": 2},
        {"name": "missing", "images": "no-such-folder", "token": "<x>"},
        {"name": "badlr", "images": "purple-ring", "token": "<x>", "lr": -1},
    ]
    (root / "jobs.jsonl").write_text("# toy jobs\n" + "".join(json.dumps({**common, **x}) + "\n" for x in lines))
    long = {**common, "name": "long", "images": "purple-ring", "token": "<ring>", "steps": LONG, "checkpoint_every": 10}
    (root / "long.jsonl").write_text(json.dumps(long) + "\n")
    return root


GOOD = {"ring-seed0": (["purple-ring"], {"--seed": "0"}), "ring-seed1": (["purple-ring"], {"--seed": "1"}),
        "tri": (["green-triangle"], {"--lr": "0.03"}), "tri-seq": (["green-triangle"], {"--seed": "2", "--sequential": None})}

_refs: dict = {}


def reference(world: Path, name: str, threads: int | None, steps: int = STEPS) -> np.ndarray:
    """The embedding plain `personalize` learns for job ``name`` with ``threads`` ONNX Runtime
    threads (None: the default profile, untouched)."""
    key = (name, threads, steps)
    if key not in _refs:
        images, opts = GOOD.get(name, (["purple-ring"], {}))
        token = "<ring>" if "ring" in images[0] else "<tri>"
        out = world / "refs" / f"{name}-{threads}-{steps}.safetensors"
        out.parent.mkdir(exist_ok=True)
        argv = ["personalize", BUNDLE, str(world / images[0]), "--token", token, "--init", "shape", "--steps", str(steps),
                "--out", str(out), "-q", *[a for k, v in opts.items() for a in ([k] if v is None else [k, v])]]
        if threads is not None:
            prof = out.with_suffix(".toml")
            prof.write_text(profile_with_threads("auto", threads))
            argv += ["--device", str(prof)]
        cli(*argv, check=0)
        _refs[key] = tensor(out)
    return _refs[key]


def threads_of(job: Path) -> int:
    import tomllib

    return tomllib.loads((job / "profile.toml").read_text())["intra_op_threads"]


def ledger(run: Path) -> list[dict]:
    return read_jsonl(run / "ledger.jsonl")


def last(run: Path, job: str) -> dict:
    return [r for r in ledger(run) if r.get("job") == job][-1]


# ------------------------------------------------------------------------- job file ----------

@pytest.mark.parametrize("content, message", [
    (None, "job file not found"),
    ('{"bundle": "b", "images": "i", "token": "<t>", "init": "x"}\n{"bundle": ', ":2: not a JSON object"),
    ('{"bundle": "b", "images": "i", "token": "<t>", "init": "x", "lrr": 1}', "unknown key 'lrr'"),
    ('{"bundle": "b", "images": "i", "token": "<t>", "init": "x", "checkpoint": "c"}', "'checkpoint' is set by personalize-many"),
    ('{"bundle": "b", "images": "i", "token": "<t>", "init": "x", "seed": "one"}', "'seed' must be a whole number"),
    ('{"bundle": "b", "images": "i", "token": "<t>", "init": "x", "grid": {"lr": []}}', "grid 'lr' must be a non-empty list"),
    ('{"bundle": "b", "images": "i", "init": "x"}', "missing 'token'"),
    ('[1, 2]', "a job is a JSON object"),
    ('{"name": "a", "bundle": "b", "images": "i", "token": "<t>", "init": "x"}\n'
     '{"name": "a", "bundle": "b", "images": "i", "token": "<t>", "init": "x"}', "job name 'a' is also line 1's"),
])
def test_a_bad_job_file_is_one_error_line(tmp_path, content, message):
    jobs = tmp_path / "jobs.jsonl"
    if content is not None:
        jobs.write_text(content)
    r = cli("personalize-many", str(jobs), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--ray", "local", "--jobs", "2"], "--jobs sets the local pool"),
    (["--retries", "-1"], "--retries must be at least 0"),
    (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),  # Ray itself would retry without end
    (["--ray", "nonsense"], "want local, auto, HOST:PORT"),
])
def test_bad_options_are_one_error_line(world, tmp_path, argv, message):
    if "--ray" in argv and "--jobs" not in argv:
        pytest.importorskip("ray")
    r = cli("personalize-many", str(world / "jobs.jsonl"), "--out", str(tmp_path / "run"), *argv)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_grid_line_expands_to_named_jobs(tmp_path):
    from zoodip_edge.many import read_jobs

    (tmp_path / "jobs.jsonl").write_text(json.dumps({"name": "s", "bundle": "b", "images": "i", "token": "<t>",
                                                     "init": "x", "grid": {"lr": [0.01, 0.02], "mu": [1e-3], "seed": [0, 1, 2]}}))
    jobs = read_jobs(tmp_path / "jobs.jsonl")
    assert [j.name for j in jobs][:2] == ["s-lr0.01-mu0.001-seed0", "s-lr0.01-mu0.001-seed1"] and len(jobs) == 6
    assert {(j.options["lr"], j.options["seed"]) for j in jobs} == {(a, b) for a in (0.01, 0.02) for b in (0, 1, 2)}
    assert jobs[0].options["bundle"] == str(tmp_path / "b")  # relative to the job file


def test_a_folder_that_is_not_a_run_is_refused(world, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.md").write_text("mine")
    r = cli("personalize-many", str(world / "jobs.jsonl"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "has no ledger.jsonl" in r.stderr
    assert (tmp_path / "run" / "report.md").read_text() == "mine"


# ------------------------------------------------------------------------ local pool ----------

@pytest.fixture(scope="module")
def local_run(world) -> tuple[Path, subprocess.CompletedProcess]:
    run = world / "local"
    return run, cli("personalize-many", str(world / "jobs.jsonl"), "--out", str(run), "--evaluate")


def test_local_pool_equals_plain_personalize_and_isolates_bad_jobs(world, local_run):
    run, r = local_run
    assert r.returncode == 1 and "4 of 6 jobs done, 2 failed" in r.stdout, r.stderr
    for name in GOOD:
        job = run / "jobs" / name
        assert last(run, name)["event"] == "done"
        assert np.array_equal(tensor(job / "learned_embeds.safetensors"), reference(world, name, threads_of(job))), name
        assert (job / "grid.png").is_file()
    assert "image path not found" in last(run, "missing")["reason"]
    assert "lr" in last(run, "badlr")["reason"] and "-1" in last(run, "badlr")["reason"]  # personalize's refusal
    assert last(run, "missing")["event"] == last(run, "badlr")["event"] == "failed"
    csv = (run / "report.csv").read_text().splitlines()
    assert len(csv) == 7 and csv[0].startswith("job,state,attempts,steps,seconds,peak_rss_mb,final_loss")
    md = (run / "report.md").read_text()
    assert "| ring-seed0 | done | 1 | 30 |" in md and "jobs/tri/grid.png" in md
    score = json.loads((run / "jobs" / "tri" / "result.json").read_text())
    assert 0 <= score["concept_score"] <= 1 and score["held_out_loss"] > 0


def test_rerun_skips_finished_jobs(world, local_run):
    run, _ = local_run
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("jobs/*/*") if p.name != "personalize.log"}
    attempts = {n: len(read_jsonl(run / "jobs" / n / "attempts.jsonl")) for n in GOOD}
    before = len(ledger(run))
    r = cli("personalize-many", str(world / "jobs.jsonl"), "--out", str(run), "--evaluate")
    assert r.returncode == 1 and "4 of 6 jobs finished in an earlier run: skipped" in r.stderr
    new = ledger(run)[before:]
    assert {x["job"] for x in new if x.get("event") == "start"} == {"missing", "badlr"}  # only the failed ones again
    assert attempts == {n: len(read_jsonl(run / "jobs" / n / "attempts.jsonl")) for n in GOOD}
    for p, t in stamps.items():
        if p.parent.name in GOOD:
            assert p.stat().st_mtime_ns == t, p
    assert last(run, "badlr")["attempts"] == 2  # the ledger counts every try of a job


def test_rerun_with_changed_options_is_refused(world, local_run):
    run, _ = local_run
    changed = world / "changed.jsonl"  # beside the job file: the same relative paths
    changed.write_text((world / "jobs.jsonl").read_text().replace('"lr": 0.03', '"lr": 0.04'))
    r = cli("personalize-many", str(changed), "--out", str(run))
    assert r.returncode == 2 and "job 'tri' has other options" in r.stderr


def test_threads_as_personalize_default_equal_plain_personalize(world, tmp_path):
    """With the thread count ONNX Runtime picks by default (one per physical core), a job equals a
    plain `personalize` run without --device."""
    import psutil

    jobs = tmp_path / "one.jsonl"
    jobs.write_text(json.dumps({"name": "ring-seed1", "bundle": BUNDLE, "images": str(world / "purple-ring"),
                                "token": "<ring>", "init": "shape", "steps": STEPS, "seed": 1}) + "\n")
    cli("personalize-many", str(jobs), "--out", str(tmp_path / "run"),
        "--threads-per-job", str(psutil.cpu_count(logical=False)), check=0)
    got = tensor(tmp_path / "run" / "jobs" / "ring-seed1" / "learned_embeds.safetensors")
    assert np.array_equal(got, reference(world, "ring-seed1", None))


def _wait_for(cond, timeout: float = 60.0, what: str = "") -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _dead(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _checkpointed(job: Path) -> bool:
    return (job / "checkpoint.ckpt").is_file() and bool(read_jsonl(job / "attempts.jsonl"))


def test_a_killed_personalize_process_is_retried_from_its_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    job = run / "jobs" / "long"
    driver = subprocess.Popen([sys.executable, "-m", "zoodip_edge.cli", "personalize-many", str(world / "long.jsonl"),
                               "--out", str(run), "--threads-per-job", "1"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _checkpointed(job), what="the first checkpoint")
    os.kill(read_jsonl(job / "attempts.jsonl")[0]["pid"], signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr
    tries = [a for a in read_jsonl(job / "attempts.jsonl") if "exit" in a]
    assert [a["exit"] for a in tries] == [-signal.SIGKILL, 0]
    assert [a["resume"] for a in read_jsonl(job / "attempts.jsonl") if "resume" in a] == [False, True]
    assert last(run, "long")["attempts"] == 2
    assert np.array_equal(tensor(job / "learned_embeds.safetensors"), reference(world, "long", 1, LONG))


def test_a_killed_driver_leaves_no_worker_and_a_rerun_resumes(world, tmp_path):
    run = tmp_path / "run"
    job = run / "jobs" / "long"
    argv = [sys.executable, "-m", "zoodip_edge.cli", "personalize-many", str(world / "long.jsonl"), "--out", str(run),
            "--threads-per-job", "1"]
    driver = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _checkpointed(job), what="the first checkpoint")
    driver.kill()
    driver.wait()
    child = read_jsonl(job / "attempts.jsonl")[0]["pid"]
    _wait_for(lambda: _dead(child), timeout=10, what="the orphaned personalize to die")
    assert not (job / "learned_embeds.safetensors").exists()
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [a["resume"] for a in read_jsonl(job / "attempts.jsonl") if "resume" in a] == [False, True]
    assert np.array_equal(tensor(job / "learned_embeds.safetensors"), reference(world, "long", 1, LONG))


def test_the_local_pool_imports_neither_ray_nor_torch(world, tmp_path):
    """The device install has no Ray and no torch: the local pool's driver imports neither (its personalize
    processes are the runtime's, which other tests check)."""
    from conftest import BLOCK_TORCH

    jobs = tmp_path / "one.jsonl"
    jobs.write_text(json.dumps({"bundle": BUNDLE, "images": str(world / "purple-ring"), "token": "<ring>",
                                "init": "shape", "steps": 3}) + "\n")
    code = BLOCK_TORCH.replace("('torch', 'diffusers', 'transformers')", "('torch', 'diffusers', 'transformers', 'ray')") + (
        "from zoodip_edge.many import personalize_many\n"
        f"outcomes, _, _ = personalize_many({str(jobs)!r}, {str(tmp_path / 'run')!r})\n"
        "assert outcomes['job1']['state'] == 'done', outcomes\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'ray')]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "jobs" / "job1" / "grid.png").is_file()


# -------------------------------------------------------------------------------- Ray ----------

def test_ray_local_runs_the_jobs_bit_equal(world):
    """`--ray local`: the command starts its own Ray instance on this machine, one task per job."""
    pytest.importorskip("ray")
    run = world / "ray"
    r = cli("personalize-many", str(world / "jobs.jsonl"), "--out", str(run), "--ray", "local")
    assert r.returncode == 1 and "4 of 6 jobs done, 2 failed" in r.stdout, r.stderr
    for name in GOOD:
        job = run / "jobs" / name
        assert threads_of(job) == 1
        assert np.array_equal(tensor(job / "learned_embeds.safetensors"), reference(world, name, 1)), name
    assert "image path not found" in last(run, "missing")["reason"]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU on this machine (the head runs no tasks), so a node can die mid-job."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _run_in_thread(jobs: Path, run: Path) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(out=personalize_many(jobs, run, ray="auto")))
    t.start()
    return t, result


def _ended_on_ray(world: Path, run: Path, t: threading.Thread, result: dict) -> list[dict]:
    t.join(timeout=180)
    outcomes, _, _ = result["out"]
    assert outcomes["long"]["state"] == "done", outcomes
    job = run / "jobs" / "long"
    starts = [a for a in read_jsonl(job / "attempts.jsonl") if "resume" in a]
    assert [a["resume"] for a in starts] == [False, True]
    assert np.array_equal(tensor(job / "learned_embeds.safetensors"), reference(world, "long", 1, LONG))
    return starts


def test_a_killed_ray_worker_is_retried_and_resumes(world, tmp_path, cluster):
    run = tmp_path / "run"
    t, result = _run_in_thread(world / "long.jsonl", run)
    _wait_for(lambda: _checkpointed(run / "jobs" / "long"), what="the first checkpoint")
    worker = read_jsonl(run / "jobs" / "long" / "attempts.jsonl")[0]["worker_pid"]
    assert worker != os.getpid()
    os.kill(worker, signal.SIGKILL)  # the Ray worker process running the task, and with it its personalize
    starts = _ended_on_ray(world, run, t, result)
    assert starts[1]["worker_pid"] != worker


def test_a_dead_ray_node_is_survived(world, tmp_path, cluster):
    """The node running a job dies (its raylet and workers stop): Ray runs the task on the other node."""
    import psutil

    c, nodes = cluster
    run = tmp_path / "run"
    t, result = _run_in_thread(world / "long.jsonl", run)
    _wait_for(lambda: _checkpointed(run / "jobs" / "long"), what="the first checkpoint")
    worker = read_jsonl(run / "jobs" / "long" / "attempts.jsonl")[0]["worker_pid"]
    above = {p.pid for p in psutil.Process(worker).parents()}
    victim = [n for n in nodes if n.all_processes["raylet"][0].process.pid in above]
    assert len(victim) == 1
    c.remove_node(victim[0])
    _ended_on_ray(world, run, t, result)
