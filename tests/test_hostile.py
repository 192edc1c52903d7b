"""Every command against the user's existing files: refusals change nothing, --force replaces only
what it says, runs on one output exclude each other, and killed writers' leftovers are cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from zoodip_edge.bundle import load_bundle
from zoodip_edge.embeddings import save_embedding
from zoodip_edge.errors import UserError
from zoodip_edge.files import exclusive_lock, lock_path, write_atomic
from zoodip_edge.runtime.zo import ZOConfig, replay

from cli_checks import TOKEN, ok, personalize_args, refused, snapshot, write


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- export --

def test_export_never_onto_the_model_or_a_folder_holding_it(sd1_pipeline, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(sd1_pipeline, target_is_directory=True)
    outer = tmp_path / "outer"
    write(outer / "model" / "model_index.json", "{}")
    single = write(tmp_path / "ckpts" / "model.safetensors", "weights")
    configs = write(tmp_path / "configs" / "model_index.json", "{}").parent
    cases = [
        ([sd1_pipeline, "--out", sd1_pipeline], sd1_pipeline),
        ([sd1_pipeline, "--out", link], sd1_pipeline),
        ([link, "--out", sd1_pipeline], sd1_pipeline),
        ([outer / "model", "--out", outer], outer),
        ([single, "--out", single.parent], single.parent),
        ([single, "--out", single], single.parent),
        ([single, "--config", configs, "--out", configs], configs),
        ([single, "--config", configs, "--out", tmp_path], tmp_path),
    ]
    for args, root in cases:
        refused(["export", *args, "--force"], root, tmp_path, match="the model being exported")


def test_export_force_refuses_what_is_not_a_bundle(sd1_pipeline, sd1_bundle, tmp_path):
    notes = write(tmp_path / "notes" / "todo.txt").parent
    a_file = write(tmp_path / "file.txt")
    listed = write(tmp_path / "listed" / "manifest.json", "[1, 2]").parent
    other = write(tmp_path / "other" / "manifest.json", json.dumps({"name": "my project"})).parent
    garbage = write(tmp_path / "garbage" / "manifest.json", "{not json").parent
    link = tmp_path / "link"
    link.symlink_to(sd1_bundle, target_is_directory=True)
    for out in (notes, a_file, listed, other, garbage, link):
        refused(["export", sd1_pipeline, "--out", out, "--force"], tmp_path, sd1_bundle, match="not a zoodip-edge bundle")
    refused(["export", sd1_pipeline, "--out", sd1_bundle], sd1_bundle, match="pass --force to replace it")


@pytest.mark.slow  # a full export or a trained run
def test_export_force_replaces_a_bundle_and_only_our_leftovers(sd1_pipeline, bundle_copy, tmp_path):
    out = bundle_copy
    write(out / "stale.txt", "from the old bundle")
    users = write(tmp_path / "bundle.old-zoodip" / "notes.txt").parent  # the old fixed name: the user's now
    dead, hex12 = dead_pid(), "0123456789ab"
    stale = write(tmp_path / f".bundle.partial-{dead}-{hex12}" / "unet" / "model.onnx", "half").parent.parent
    stale_old = write(tmp_path / f".bundle.old-{dead}-{hex12}" / "manifest.json", "{}").parent
    kept = [write(tmp_path / f".bundle.partial-{os.getpid()}-{hex12}" / "x").parent,  # a live writer's
            write(tmp_path / f".bundle.partial-{dead}-{hex12}.keep" / "x").parent,  # not exactly our name
            write(tmp_path / f".bundle.partial-{dead}-zzz" / "x").parent,
            write(tmp_path / f".other.partial-{dead}-{hex12}" / "x").parent,  # another output's
            write(tmp_path / f".bundle.partial-{dead}-{hex12}0")]  # a file
    before = snapshot(users, *kept)
    ok(["export", sd1_pipeline, "--out", out, "--recipe", "fp32", "--force"])
    assert load_bundle(out).recipe == "fp32" and not (out / "stale.txt").exists()
    assert snapshot(users, *kept) == before
    assert not stale.exists() and not stale_old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", "bundle.old-zoodip", *(p.name for p in kept)])


def test_export_takes_a_lock_on_its_output(sd1_pipeline, tmp_path):
    out = tmp_path / "b"
    with exclusive_lock(out):
        refused(["export", sd1_pipeline, "--out", out], tmp_path, match="another run is using")
    assert not lock_path(out).exists()


# ------------------------------------------------------------------------ personalize --

_cli = personalize_args


def _from_word(bundle, photos, out, *extra) -> list:
    """A run from the --init word, without the search for a better start (init_search.py, the subject
    of test_steps.py), which would take most of each run: these tests are about checkpoints and logs."""
    return _cli(bundle, photos, out, "--no-search-init", *extra)


def _meta(path: Path) -> dict:
    with safe_open(str(path), "np") as f:
        return f.metadata()


def test_checkpoint_never_replaces_a_file_that_is_not_a_checkpoint(bundle_copy, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    table = bundle_copy / "token_embeddings.safetensors"
    outside = tmp_path / "table.safetensors"
    shutil.copy(table, outside)
    embedding = tmp_path / "mine.safetensors"
    save_embedding(embedding, "<mine>", np.ones((1, 32), np.float32))
    notes = write(tmp_path / "notes.txt")
    refused(_cli(bundle_copy, photos, out, "--checkpoint", table, "--force"), bundle_copy, tmp_path,
            match="inside the bundle folder")
    for ckpt in (outside, embedding, notes):
        for extra in ([], ["--force"], ["--resume"], ["--resume", "--force"]):
            refused(_cli(bundle_copy, photos, out, "--checkpoint", ckpt, "--steps", "2", *extra), bundle_copy, tmp_path,
                    match="is not a zoodip-edge checkpoint")


def test_checkpoint_of_another_run_is_replaced_only_with_force(sd1_bundle, photos, tmp_path):
    ckpt = tmp_path / "shared.ckpt"
    ok(_from_word(sd1_bundle, photos, tmp_path / "a.safetensors", "--steps", "2", "--seed", "1", "--checkpoint", ckpt))
    b = tmp_path / "b.safetensors"
    refused(_from_word(sd1_bundle, photos, b, "--steps", "2", "--seed", "2", "--checkpoint", ckpt), tmp_path,
            match="different run (differs in: seed); pass --force")
    refused(_from_word(sd1_bundle, photos, b, "--steps", "2", "--seed", "2", "--checkpoint", ckpt, "--resume", "--force"), tmp_path,
            match="different run (differs in: seed)")
    ok(_from_word(sd1_bundle, photos, b, "--steps", "2", "--seed", "2", "--checkpoint", ckpt, "--force"))
    from zoodip_edge.runtime.checkpoint import checkpoint_identity

    assert checkpoint_identity(ckpt)["seed"] == 2


def test_this_runs_checkpoint_needs_resume_or_force(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    ckpt = Path(f"{out}.ckpt")
    ok(_from_word(sd1_bundle, photos, out, "--steps", "2"))
    out.unlink()  # as if the run had been killed after its checkpoint
    refused(_from_word(sd1_bundle, photos, out, "--steps", "2"), tmp_path,
            match="is this run's checkpoint; pass --resume to continue or --force to start over")
    ok(_from_word(sd1_bundle, photos, out, "--steps", "4", "--resume"))
    assert _meta(out)["steps"] == "4"
    ok(_from_word(sd1_bundle, photos, out, "--steps", "3", "--force"))  # starts over
    assert _meta(out)["steps"] == "3"
    from zoodip_edge.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt)["optimizer"]["step"] == 3


def test_resume_keeps_this_runs_log_and_refuses_any_other(sd1_bundle, photos, tmp_path):
    out, log = tmp_path / "e.safetensors", tmp_path / "run.jsonl"
    ok(_from_word(sd1_bundle, photos, out, "--steps", "4", "--log-jsonl", log))
    ok(_from_word(sd1_bundle, photos, out, "--steps", "6", "--log-jsonl", log, "--resume"))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [s["step"] for s in lines[1:]] == list(range(6))
    theta = replay(np.array(lines[0]["theta0"]), ZOConfig(**lines[0]["config"]), lines[1:])
    np.testing.assert_array_equal(theta.astype(np.float32), load_file(str(out))[TOKEN][0])
    other = write(tmp_path / "other.jsonl", json.dumps({"type": "start", "seed": 9}) + "\n")
    refused(_from_word(sd1_bundle, photos, out, "--steps", "8", "--log-jsonl", other, "--resume"), tmp_path,
            match="is not this run's log")
    notes = write(tmp_path / "notes.txt")
    refused(_from_word(sd1_bundle, photos, tmp_path / "new.safetensors", "--steps", "2", "--log-jsonl", notes), tmp_path,
            match=f"{notes} exists; pass --force to replace it")
    refused(_from_word(sd1_bundle, photos, out, "--steps", "8", "--log-jsonl", notes, "--resume"), tmp_path,
            match="is not this run's log")


def test_personalize_output_refusals(bundle_copy, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    write(folder / "notes.txt")
    refused(_cli(bundle_copy, photos, folder, "--force"), tmp_path, match="is a folder")
    refused(_cli(bundle_copy, photos, out, "--checkpoint", tmp_path), tmp_path, match="is a folder")
    refused(_cli(bundle_copy, photos, out, "--checkpoint", out), tmp_path, match="name the same file")
    refused(_cli(bundle_copy, photos, out, "--log-jsonl", out), tmp_path, match="name the same file")
    refused(_cli(bundle_copy, photos, bundle_copy / "token_embeddings.safetensors", "--force"), bundle_copy, tmp_path,
            match="inside the bundle folder")
    refused(_cli(bundle_copy, photos, tmp_path / "e.bin"), tmp_path, match="name the file *.safetensors")
    write(out, "keep me")
    refused(_cli(bundle_copy, photos, out), tmp_path, match="pass --force to replace it")
    previews = tmp_path / "p.safetensors"
    write(tmp_path / "p-preview-000002.png", "a picture of the user's")
    refused(_cli(bundle_copy, photos, previews, "--steps", "2", "--preview-every", "2"), tmp_path,
            match="p-preview-000002.png exists; pass --force")


def test_resume_does_not_replace_an_unrelated_output(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    ok(_from_word(sd1_bundle, photos, out, "--steps", "2"))
    save_embedding(out, "<someone-else>", np.ones((1, 32), np.float32))
    refused(_from_word(sd1_bundle, photos, out, "--steps", "4", "--resume"), tmp_path, match="is not this run's embedding")


def _subprocess_cli(args: list) -> subprocess.Popen:
    code = "import sys; from zoodip_edge.cli import main; sys.argv = ['zoodip-edge'] + sys.argv[1:]; main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_on_one_output_exclude_each_other(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    first = _subprocess_cli(_cli(sd1_bundle, photos, out, "--steps", "100000", "--checkpoint-every", "0"))
    try:
        t0 = time.time()
        while not lock_path(out).exists():
            assert first.poll() is None, first.communicate()
            assert time.time() - t0 < 120
            time.sleep(0.02)
        refused(_cli(sd1_bundle, photos, out, "--steps", "2", "--force"), tmp_path, match=f"another run is using {out}")
        # another output, the same checkpoint
        refused(_cli(sd1_bundle, photos, tmp_path / "f.safetensors", "--steps", "2", "--checkpoint", f"{out}.ckpt"),
                tmp_path, match="another run is using")
        assert first.poll() is None, "the first run must still be running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert lock_path(out).exists()  # a killed run leaves its lock file, unlocked
    ok(_cli(sd1_bundle, photos, out, "--steps", "2"))
    assert not list(tmp_path.glob(".*.lock"))


# ---------------------------------------------------------------------- temporaries --

def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "e.safetensors"
    dead, hex12 = dead_pid(), "0123456789ab"
    stale = write(tmp_path / f".e.safetensors.{dead}-{hex12}.tmp", "half")
    kept = [write(tmp_path / f".e.safetensors.{os.getpid()}-{hex12}.tmp"),  # a live writer's
            write(tmp_path / f".e.safetensors.{dead}-{hex12[:6]}.tmp"),  # not exactly our name
            write(tmp_path / f".e.safetensors.{dead}-{hex12}.tmp.bak"),
            write(tmp_path / f".f.safetensors.{dead}-{hex12}.tmp"),  # another target's
            write(tmp_path / f".e.safetensors.{dead}-{hex12[::-1]}.tmp" / "x").parent,  # a folder
            write(tmp_path / "notes.tmp")]
    link = tmp_path / f".e.safetensors.{dead}-{'ab' * 6}.tmp"
    link.symlink_to(kept[-1])
    kept.append(link)
    before = snapshot(*kept)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and not stale.exists()
    assert snapshot(*kept) == before
    assert {p.name for p in tmp_path.iterdir()} == {target.name, *(p.name for p in kept)}


def test_write_atomic_names_its_temporary_with_its_pid(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    write_atomic(tmp_path / "x.bin", b"1")
    assert len(seen) == 1 and seen[0].startswith(f".x.bin.{os.getpid()}-") and seen[0].endswith(".tmp")


def test_lock_is_exclusive_removed_on_release_and_survives_a_stale_file(tmp_path):
    target = tmp_path / "out"
    write(lock_path(target), "")  # left by a killed run: exists, nobody holds it
    with exclusive_lock(target):
        with pytest.raises(UserError, match="another run is using"):
            with exclusive_lock(target):
                pass
    assert not lock_path(target).exists()
    with exclusive_lock(target):
        assert lock_path(target).exists()


# ------------------------------------------------------- generate, demo, evaluate, convert --

@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("emb") / "learned_embeds.safetensors"
    save_embedding(path, "<thing>", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    return path


def test_generate_never_writes_over_existing_images(sd1_bundle, learned, tmp_path):
    out = tmp_path / "images"
    base = ["generate", sd1_bundle, "--prompt", "a photo of <thing>", "--embedding", learned, "--out", out,
            "-n", "2", "--steps", "2", "--device", "cpu", "-q"]
    photo = write(out / "0000-01.png", "the user's photo")
    refused(base, tmp_path, match=f"{photo} exists; pass --force to replace it")
    photo.unlink()
    write(out / "grid.png", "the user's grid")
    refused(base, tmp_path, match="grid.png exists")
    refused(base + ["--seed", "3"], tmp_path, match="grid.png exists")
    refused([*base[:7], write(tmp_path / "file.txt"), *base[8:]], tmp_path, match="is not a folder")
    notes = write(out / "notes.txt")
    ok(base + ["--force"])
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG" and notes.read_text() == "the user's own notes"
    assert sorted(p.name for p in out.iterdir()) == ["0000-00.png", "0000-01.png", "grid.png", "notes.txt"]


@pytest.mark.slow  # a full export or a trained run
def test_demo_rerun_is_refused_unless_forced(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--steps", "2", "--images", "1"]
    write(out / "grid.png", "an earlier grid")
    refused(args, tmp_path, match="grid.png exists; pass --force")
    (out / "grid.png").unlink()
    write(out / "photos" / "mine.png", "a photo")
    refused(args, tmp_path, match="photos exists; pass --force")
    refused(["demo", "--out", write(tmp_path / "file.txt")], tmp_path, match="is not a folder")
    shutil.rmtree(out / "photos")
    notes = write(out / "notes.txt")
    ok(args)
    refused(args, tmp_path, match="exists (and 3 more of its outputs); pass --force")
    grid = (out / "grid.png").read_bytes()
    ok(args + ["--force", "--seed", "1"])
    assert (out / "grid.png").read_bytes() != grid and notes.read_text() == "the user's own notes"


def test_evaluate_never_writes_over_earlier_results(sd1_bundle, learned, photos, tmp_path):
    out = tmp_path / "eval"
    write(out / "results.json", "{}")
    common = ["evaluate", "--references", photos, "--class-word", "ball", "--token", "<thing>", "--out", out]
    refused(common + ["--generated", photos, "--prompt", "a photo of <thing>"], tmp_path, match="results.json exists")
    (out / "results.json").unlink()
    write(out / "images" / "00" / "00.png", "an image")
    refused(common + ["--all", "--bundle", sd1_bundle, "--embedding", learned], tmp_path, match="images exists")


def test_convert_never_writes_over_an_existing_file(learned, tmp_path):
    dst = write(tmp_path / "dst.safetensors")
    refused(["convert", learned, dst], tmp_path, match="pass --force to replace it")
    ok(["convert", learned, dst, "--force"])
    assert list(load_file(str(dst))) == ["<thing>"]
