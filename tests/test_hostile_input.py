"""Clumsy and hostile input to every command: a resume never continues from inputs that changed,
damaged checkpoints and manifests are refused, numbers no run can use are refused before any work,
and every case ends in one `error:` line with the user's files as they were."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from zoodip_edge.cli import app
from zoodip_edge.embeddings import save_embedding
from zoodip_edge.runtime.checkpoint import load_checkpoint, save_checkpoint
from zoodip_edge.runtime.zo import ZOConfig, replay

from cli_checks import TOKEN, ok, personalize_args, refused, runner, write

cli = personalize_args


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("emb") / "learned_embeds.safetensors"
    save_embedding(path, "<thing>", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    return path


@pytest.fixture()
def my_photos(photos, tmp_path) -> Path:
    """A private copy of the photos, to change under a run."""
    return Path(shutil.copytree(photos, tmp_path / "photos"))


# ------------------------------------------------------------- resume: same inputs only --

def test_resume_refuses_inputs_that_changed(sd1_bundle, photos, my_photos, tmp_path):
    out = tmp_path / "e.safetensors"
    ok(cli(sd1_bundle, my_photos, out, "--steps", "2"))
    out.unlink()  # as if the run had been killed after its checkpoint
    names = sorted(p.name for p in my_photos.iterdir())
    original = (my_photos / names[0]).read_bytes()
    shutil.copy(my_photos / names[1], my_photos / names[0])  # same name, another picture
    refused(cli(sd1_bundle, my_photos, out, "--steps", "4", "--resume"), tmp_path, match="differs in: images")
    (my_photos / names[0]).write_bytes(original)
    (my_photos / names[-1]).unlink()  # one photo fewer
    refused(cli(sd1_bundle, my_photos, out, "--steps", "4", "--resume"), tmp_path, match="differs in: images")
    shutil.copy(photos / names[-1], my_photos / names[-1])
    shutil.copy(photos / names[0], my_photos / "extra.png")  # one photo more
    refused(cli(sd1_bundle, my_photos, out, "--steps", "4", "--resume"), tmp_path, match="differs in: images")
    (my_photos / "extra.png").unlink()
    ok(cli(sd1_bundle, my_photos, out, "--steps", "4", "--resume"))  # the same photos again: it continues


def test_resume_refuses_other_captions_templates_or_start(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    names = sorted(p.name for p in photos.iterdir())
    captions = write(tmp_path / "captions.json", json.dumps({n: "a photo of {} on a table" for n in names}))
    ok(cli(sd1_bundle, photos, out, "--steps", "2", "--captions", captions))
    out.unlink()
    write(captions, json.dumps({n: "a photo of {} on the grass" for n in names}))
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume", "--captions", captions), tmp_path,
            match="differs in: captions")
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume"), tmp_path, match="differs in: captions")
    write(captions, json.dumps({n: "a photo of {} on a table" for n in names}))
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume", "--captions", captions, "--templates", "style"),
            tmp_path, match="differs in: templates")
    start = tmp_path / "start.safetensors"
    save_embedding(start, "<start>", np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32))
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume", "--captions", captions, "--init-embedding", start),
            tmp_path, match="init_embedding")
    ok(cli(sd1_bundle, photos, out, "--steps", "4", "--resume", "--captions", captions))
    assert load_checkpoint(Path(f"{out}.ckpt"))["optimizer"]["step"] == 4


def test_a_given_start_embedding_is_part_of_the_run(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    start = tmp_path / "start.safetensors"
    save_embedding(start, "<start>", np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32))
    ok(cli(sd1_bundle, photos, out, "--steps", "2", "--init-embedding", start))
    out.unlink()
    save_embedding(start, "<start>", np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32))
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume", "--init-embedding", start), tmp_path,
            match="differs in: init_embedding")
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume"), tmp_path, match="init_embedding")


# --------------------------------------------------------------------- damaged checkpoints --

@pytest.fixture(scope="module")
def checkpoint_of_two_steps(sd1_bundle, photos, tmp_path_factory) -> Path:
    """The checkpoint of a run killed after step 2 (one run: the tests below get copies)."""
    out = tmp_path_factory.mktemp("killed") / "e.safetensors"
    ok(cli(sd1_bundle, photos, out, "--steps", "2"))
    out.unlink()
    return Path(f"{out}.ckpt")


@pytest.fixture()
def run_with_checkpoint(checkpoint_of_two_steps, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "e.safetensors"
    shutil.copy(checkpoint_of_two_steps, f"{out}.ckpt")  # the identity names no path: it resumes here
    return out, Path(f"{out}.ckpt")


def test_a_damaged_checkpoint_is_not_resumed(sd1_bundle, photos, tmp_path, run_with_checkpoint):
    out, ckpt = run_with_checkpoint
    good = ckpt.read_bytes()
    resume = cli(sd1_bundle, photos, out, "--steps", "4", "--resume")
    damaged = bytearray(good)
    damaged[-3] ^= 0x40  # one bit of the last tensor's data
    ckpt.write_bytes(bytes(damaged))
    refused(resume, tmp_path, match="does not match its checksum")
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8:8 + n].decode()
    edited = header.replace('\\"step\\": 2', '\\"step\\": 7')  # the JSON state is a string inside the header
    assert edited != header
    ckpt.write_bytes(good[:8] + edited.encode() + good[8 + n:])
    refused(resume, tmp_path, match="does not match its checksum")
    ckpt.write_bytes(good[: len(good) // 2])  # truncated
    refused(resume, tmp_path, match="is not a zoodip-edge checkpoint")
    ckpt.write_bytes(good)
    ok(resume)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["optimizer"].update(theta=np.zeros(5)), "optimizer.theta"),
    (lambda s: s["optimizer"].update(step="two"), "optimizer.step"),
    (lambda s: s["optimizer"].update(step=-1), "optimizer.step"),
    (lambda s: s["optimizer"].pop("adam"), "missing adam"),
    (lambda s: s["optimizer"]["adam"].update(v=np.full(32, np.nan)), "optimizer.adam.v"),
    (lambda s: s["optimizer"].update(rng={"bit_generator": "MT19937", "state": {}}), "optimizer.rng.bit_generator"),
    (lambda s: s["optimizer"]["rng"].update(state={"state": "x", "inc": 1}), "malformed"),
    (lambda s: s.update(identity="[]"), "differs in"),
    (lambda s: s.pop("identity"), "belongs to a different run"),
])
def test_a_checkpoint_with_malformed_fields_is_refused(sd1_bundle, photos, tmp_path, run_with_checkpoint, edit, match):
    """Fields a resume reads are checked even when the checksum holds (a checkpoint written by hand)."""
    out, ckpt = run_with_checkpoint
    state = load_checkpoint(ckpt)
    edit(state)
    save_checkpoint(ckpt, state)
    refused(cli(sd1_bundle, photos, out, "--steps", "4", "--resume"), tmp_path, match=match)


def test_resume_with_a_torn_or_foreign_log(sd1_bundle, photos, tmp_path):
    out, log = tmp_path / "e.safetensors", tmp_path / "run.jsonl"
    ckpt = Path(f"{out}.ckpt")
    ok(cli(sd1_bundle, photos, out, "--steps", "2", "--log-jsonl", log))
    at_two = ckpt.read_bytes()
    ok(cli(sd1_bundle, photos, out, "--steps", "4", "--log-jsonl", log, "--resume"))
    text = log.read_text()
    log.write_text(text[: len(text) - 40])  # killed mid-record of step 3, after the checkpoint of step 4
    refused(cli(sd1_bundle, photos, out, "--steps", "6", "--log-jsonl", log, "--resume"), tmp_path,
            match="holds 3 of the 4 steps before the checkpoint")
    ckpt.write_bytes(at_two)  # with the checkpoint of step 2, the torn end is rewritten
    ok(cli(sd1_bundle, photos, out, "--steps", "6", "--log-jsonl", log, "--resume", "--force"))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [s["step"] for s in lines[1:]] == list(range(6))
    theta = replay(np.array(lines[0]["theta0"]), ZOConfig(**lines[0]["config"]), lines[1:])
    np.testing.assert_array_equal(theta.astype(np.float32), load_file(str(out))[TOKEN][0])
    log.write_text(text[:30])  # torn inside its start record: not this run's any more
    refused(cli(sd1_bundle, photos, out, "--steps", "8", "--log-jsonl", log, "--resume"), tmp_path,
            match="is not this run's log")
    log.write_bytes(b"\xff\xfe\x00 not text at all")
    refused(cli(sd1_bundle, photos, out, "--steps", "8", "--log-jsonl", log, "--resume"), tmp_path,
            match="is not this run's log")


# ------------------------------------------------------------------------- manifests --

def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


MANIFEST_EDITS = [
    (lambda m: m.update(family="bogus"), "family: expected one of"),
    (lambda m: m.update(family="sdxl"), "family: sdxl needs text_2"),
    (lambda m: m.update(format_version=True), "format_version"),
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m["text"].update(pad_token_id=10**6), "text.pad_token_id"),
    (lambda m: m["text"].update(pad_token_id=-1), "text.pad_token_id"),
    (lambda m: m["text"].update(max_length="77"), "text.max_length"),
    (lambda m: m.pop("text"), "missing text"),
    (lambda m: m["defaults"].update(lr="fast"), "defaults.lr"),
    (lambda m: m["defaults"].update(t_low=950), "defaults: timestep range"),
    (lambda m: m.update(latent_scale=None), "latent_scale"),
    (lambda m: m.update(resolution=-64), "resolution"),
    (lambda m: m.update(components={"unet": []}), "components"),
    (lambda m: m["components"]["unet"].update(bytes="12"), "components.unet.bytes"),
    (lambda m: m["components"]["unet"].update(sha256="0" * 10), "components.unet.sha256"),
    (lambda m: m["scheduler"].update(beta_schedule="cosine?"), "scheduler.beta_schedule"),
    (lambda m: m["scheduler"].update(prediction_type="sample"), "scheduler.prediction_type"),
    (lambda m: m["session"].update(config_entries=[1]), "session.config_entries"),
    (lambda m: m["token_embeddings"].update(shape=[10, 32]), "text.pad_token_id"),
    (lambda m: m["token_embeddings"].update(shape=[m["token_embeddings"]["shape"][0], 16]), "the token width"),
    (lambda m: m["components"]["text_encoder"]["inputs"][0].update(shape=["batch", 5, 32]), "text.max_length"),
]


@pytest.mark.parametrize("change, match", MANIFEST_EDITS)
def test_manifest_fields_are_checked(bundle_copy, photos, tmp_path, change, match):
    _edit(bundle_copy, change)
    refused(["inspect", bundle_copy], bundle_copy, match=match)
    refused(cli(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "2"), tmp_path, match=match)


@pytest.mark.parametrize("verification, said", [
    ({}, "no gate figures in the manifest"),
    ({"zo_fidelity": {"pearson": "high"}}, "no gate figures in the manifest"),
    ({"not_run": "made without the gates"}, "no gate figures in the manifest: made without the gates"),
])
def test_inspect_shows_a_bundle_without_gate_figures(bundle_copy, verification, said):
    """The schema lets ``verification`` be any object (a bundle made by benchmarks.resize_bundle says
    the gates were not run): inspect says so instead of a traceback."""
    _edit(bundle_copy, lambda m: m.update(verification=verification))
    r = runner.invoke(app, ["inspect", str(bundle_copy)])
    assert r.exit_code == 0 and r.exception is None, r.output
    assert f"verified    {said}\n" in r.output


def test_graphs_must_be_what_the_manifest_says(bundle_copy, photos, tmp_path):
    """The manifest and the graph files agree: inputs renamed or resized in either are refused."""
    _edit(bundle_copy, lambda m: m["components"]["unet"]["inputs"][2].update(name="context"))
    for args in (cli(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "2"),
                 ["generate", bundle_copy, "--prompt", "a dog", "--out", tmp_path / "g", "--steps", "2", "-q",
                  "--device", "cpu"]):
        refused(args, tmp_path, match="unet graph takes encoder_hidden_states, sample, timestep; its manifest says context")
    _edit(bundle_copy, lambda m: m["components"]["unet"]["inputs"][2].update(name="encoder_hidden_states"))
    _edit(bundle_copy, lambda m: m["components"]["vae_encoder"]["inputs"][0].update(shape=["batch", 4, 32, 32]))
    refused(cli(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "2"), tmp_path,
            match="vae_encoder input image has shape")


def test_a_token_table_whose_header_lies_is_refused(bundle_copy, photos, tmp_path):
    """Even with the manifest's hashes made to match, the table's header is checked against its file."""
    from zoodip_edge.bundle import file_entry

    table = bundle_copy / "token_embeddings.safetensors"
    data = table.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    rows, width = header[name]["shape"]
    header[name]["shape"] = [rows * 1000, width]
    raw = json.dumps(header).encode()
    table.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _edit(bundle_copy, lambda m: m["token_embeddings"].update(file_entry(bundle_copy, "token_embeddings.safetensors")))
    refused(cli(bundle_copy, photos, tmp_path / "e.safetensors", "--steps", "2"), tmp_path,
            match="shape or offsets that do not match the file")


# ------------------------------------------------------------ numbers no run can use --

def test_numbers_no_run_can_use_are_refused_before_any_work(sd1_bundle, sd1_pipeline, photos, learned, tmp_path):
    out = tmp_path / "e.safetensors"
    p = lambda *extra: cli(sd1_bundle, photos, out, "--steps", "2", *extra)  # noqa: E731
    g = lambda *extra: ["generate", sd1_bundle, "--prompt", "a dog", "--out", tmp_path / "g", "--steps", "2",  # noqa: E731
                        "-q", "--device", "cpu", *extra]
    cases = [
        (p("--lr", "nan"), "lr must be a finite number > 0"), (p("--lr", "inf"), "lr must be"),
        (p("--lr", "-1e-3"), "lr must be"), (p("--mu", "nan"), "mu must be"), (p("--mu", "0"), "mu must be"),
        (p("--nu", "nan"), "nu must be"), (p("--nu", "1"), "nu must be"), (p("--tau", "1"), "tau must be 2..4096"),
        (p("--tau", str(10**12)), "tau must be"), (p("--n", "0"), "n must be 1..256"), (p("--n", str(10**9)), "n must be"),
        (p("--seed", "-1"), "a seed is a whole number"), (p("--seed", str(2**64)), "a seed"),
        (p("--checkpoint-every", "-1"), "--checkpoint-every"), (p("--preview-every", "-5"), "--preview-every"),
        (p("--t-low", "-1"), "timestep range"), (p("--t-high", "5000"), "timestep range"),
        (cli(sd1_bundle, photos, out, "--steps", "0"), "--steps must be from 1 to 10**9"),
        (cli(sd1_bundle, photos, out, "--steps", str(10**30)), "--steps must be from 1 to 10**9"),
        (cli(sd1_bundle, photos, out, "--steps", "nan"), "--steps wants a whole number"),
        (p("--format", "ckpt"), "unknown format 'ckpt'"),
        (g("--guidance", "nan"), "guidance scale must be a number from 0 to 100"), (g("--guidance", "inf"), "guidance"),
        (g("--guidance", "-2"), "guidance"), (g("--guidance", "1e308"), "guidance"), (g("--seed", "-1"), "a seed"), (g("-n", "0"), "number of images"),
        (g("-n", "100000"), "number of images"), (g("--steps", "0"), "sampling steps"),
        (g("--steps", "100000"), "sampling steps"), (g("--tile", "0"), "--tile"),
        (["demo", "--out", tmp_path / "d", "--seed", "-3"], "a seed"),
        (["demo", "--out", tmp_path / "d", "--images", "0"], "--images"),
        (["demo", "--out", tmp_path / "d", "--steps", "0"], "--steps"),
        (["demo", "--out", tmp_path / "d", "--concept", "plaid-blob"], "is not color-shape"),
        (["export", tmp_path / "no-model", "--out", tmp_path / "b"], "model not found"),
        (["export", write(tmp_path / "model.bin", "weights"), "--out", tmp_path / "b"], "must be .safetensors or .ckpt"),
        (["export", sd1_pipeline, "--out", tmp_path / "b", "--resolution", "-64"], "--resolution"),
        (["export", sd1_pipeline, "--out", tmp_path / "b", "--resolution", "0"], "--resolution"),
        (["export", sd1_pipeline, "--out", tmp_path / "b", "--defaults", "lr=nan"], "positive finite"),
        (["export", sd1_pipeline, "--out", tmp_path / "b", "--defaults", "tau=inf"], "tau"),
        (["convert", learned, tmp_path / "c.safetensors", "--format", "zzz"], "unknown format 'zzz'"),
        (["convert", learned, tmp_path / "c.bin"], "name the file *.safetensors"),
        (["convert", learned, tmp_path / "c.safetensors", "--token", "emb_params"], "reserved"),
        (["personalize", sd1_bundle, photos, "--token", "clip_l", "--init", "dog", "--out", out], "reserved"),
    ]
    for args, match in cases:
        refused(args, tmp_path, sd1_bundle, match=match)


def test_a_diverging_run_stops_with_its_last_good_checkpoint(sd1_bundle, photos, tmp_path, monkeypatch):
    """Losses become NaN at step 4: the run says so in one line, writes no embedding, and keeps the
    checkpoint of step 3, the same as an undisturbed run's."""
    from zoodip_edge.runtime.personalize import Personalizer

    clean = tmp_path / "clean.safetensors"
    ok(cli(sd1_bundle, photos, clean, "--steps", "3", "--no-search-init"))
    real = Personalizer.losses

    def losses(self, thetas, t, noise_seed, words=None):
        out = real(self, thetas, t, noise_seed, words)
        return out * np.nan if self.step_index == 3 else out

    monkeypatch.setattr(Personalizer, "losses", losses)
    out = tmp_path / "e.safetensors"
    r = runner.invoke(app, [str(a) for a in cli(sd1_bundle, photos, out, "--steps", "8", "--no-search-init",
                                                  "--checkpoint-every", "1")])
    line = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(line) == 1 and "Traceback" not in r.output, r.output
    assert "the loss became non-finite at step 4" in line[0] and "the checkpoint of step 3 is kept" in line[0], line
    assert not out.exists()
    kept, ref = load_checkpoint(Path(f"{out}.ckpt")), load_checkpoint(Path(f"{clean}.ckpt"))
    assert kept["optimizer"]["step"] == 3
    np.testing.assert_array_equal(kept["optimizer"]["theta"], ref["optimizer"]["theta"])


def test_a_learning_rate_that_blows_up_the_token(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    refused(cli(sd1_bundle, photos, out, "--steps", "5", "--lr", "1e300", "--no-search-init"), tmp_path,
            match="left the float32 range at step 1")
    assert not os.path.exists(f"{out}.ckpt")


# ------------------------------------------------------------ paths that are not usable --

def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one where permissions bind, else
    /sys (where even root may not create files); skipped where neither holds."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        (Path("/sys") / ".zoodip-probe").touch()
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses writes to this user")


def test_outputs_that_cannot_be_written_are_refused_first(sd1_bundle, sd1_pipeline, photos, learned, tmp_path):
    ro = _unwritable_folder(tmp_path)
    cases = [
        (cli(sd1_bundle, photos, ro / "e.safetensors", "--steps", "2"), "cannot write --out"),
        (cli(sd1_bundle, photos, tmp_path / "e.safetensors", "--checkpoint", ro / "e.ckpt"), "cannot write --checkpoint"),
        (cli(sd1_bundle, photos, tmp_path / "e.safetensors", "--log-jsonl", ro / "log.jsonl"), "cannot write --log-jsonl"),
        (["generate", sd1_bundle, "--prompt", "a dog", "--out", ro / "images", "--steps", "2", "-q"], "cannot write"),
        (["generate", sd1_bundle, "--prompt", "a dog", "--out", ro, "--steps", "2", "-q"], "cannot write"),
        (["demo", "--out", ro / "demo", "--steps", "2"], "cannot write"),
        (["evaluate", "--references", photos, "--class-word", "ball", "--token", "<t>", "--out", ro / "ev",
          "--generated", photos, "--prompt", "a <t>"], "cannot write"),
        (["export", sd1_pipeline, "--out", ro / "bundle"], "cannot write the bundle"),
        (["convert", learned, ro / "c.safetensors"], "cannot write"),
    ]
    for args, match in cases:
        refused(args, tmp_path, match=match)


def test_paths_that_are_not_what_they_seem(sd1_bundle, my_photos, tmp_path):
    out = tmp_path / "e.safetensors"
    a_file = write(tmp_path / "file.txt")
    refused(cli(sd1_bundle, my_photos, out, "--log-jsonl", tmp_path / "missing" / "log.jsonl"), tmp_path,
            match="--log-jsonl: folder does not exist")
    refused(cli(sd1_bundle, my_photos, out, "--checkpoint", tmp_path / "missing" / "e.ckpt"), tmp_path,
            match="--checkpoint: folder does not exist")
    refused(cli(sd1_bundle, my_photos, tmp_path / "missing" / "e.safetensors"), tmp_path,
            match="--out: folder does not exist")
    refused(["generate", sd1_bundle, "--prompt", "a dog", "--out", a_file, "--steps", "2"], tmp_path, match="is not a folder")
    refused(["demo", "--out", a_file], tmp_path, match="is not a folder")
    loop = my_photos / "loop.png"
    loop.symlink_to(my_photos / "loop2.png")
    (my_photos / "loop2.png").symlink_to(loop)
    refused(cli(sd1_bundle, my_photos, out, "--steps", "2"), tmp_path, match="loop.png (too many levels of symbolic links)")
    loop.unlink()
    (my_photos / "loop2.png").unlink()
    os.mkfifo(my_photos / "pipe.png")
    refused(cli(sd1_bundle, my_photos, out, "--steps", "2"), tmp_path, match="pipe.png (not a regular file)")
    os.unlink(my_photos / "pipe.png")
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)  # reading any of these would block for ever
    refused(cli(sd1_bundle, my_photos, out, "--captions", pipe), tmp_path, match="is not a regular file")
    refused(cli(sd1_bundle, my_photos, out, "--init-embedding", pipe), tmp_path, match="is not a regular file")
    refused(["convert", pipe, tmp_path / "c.safetensors"], tmp_path, match="is not a regular file")
    refused(["generate", sd1_bundle, "--prompt", "a dog", "--embedding", pipe, "--out", tmp_path / "g", "--steps", "2"],
            tmp_path, match="is not a regular file")


def test_evaluate_reads_images_as_personalize_does(photos, my_photos, tmp_path):
    common = ["evaluate", "--class-word", "ball", "--token", "<t>", "--out", tmp_path / "ev", "--prompt", "a <t>"]
    names = sorted(p.name for p in my_photos.iterdir())
    (my_photos / names[0]).write_bytes(b"")
    data = (my_photos / names[1]).read_bytes()
    (my_photos / names[1]).write_bytes(data[: len(data) // 2])
    os.mkfifo(my_photos / "pipe.png")
    line = refused([*common, "--references", my_photos, "--generated", photos], tmp_path, match="cannot read 3 image(s)")
    assert "(empty file)" in line and "(truncated" in line and "pipe.png (not a regular file)" in line
    refused([*common, "--references", photos, "--generated", my_photos], tmp_path, match="cannot read 3 image(s)")


def test_evaluate_without_the_hub_fails_at_once(photos, tmp_path, monkeypatch):
    args = ["evaluate", "--references", photos, "--class-word", "ball", "--token", "<t>", "--out", tmp_path / "ev",
            "--generated", photos, "--prompt", "a <t>", "--clip", "zoodip-test/not-a-cached-model"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(args, tmp_path, match="it is not in the local cache and HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    refused(args, tmp_path, match="it is not in the local cache and the model hub (127.0.0.1) cannot be reached")
    refused([*args[:-2], "--clip", tmp_path / "no-such-folder"], tmp_path, match="no such folder")


def test_generate_warns_when_an_embedding_is_not_in_the_prompt(sd1_bundle, learned, tmp_path):
    base = ["generate", sd1_bundle, "--embedding", learned, "--steps", "2", "-q", "--device", "cpu"]
    r = runner.invoke(app, [str(a) for a in [*base, "--prompt", "a photo of a dog", "--out", tmp_path / "a"]])
    assert r.exit_code == 0 and "warning: <thing> not in the prompt" in r.stderr, r.output
    r = runner.invoke(app, [str(a) for a in [*base, "--prompt", "a photo of <thing>", "--out", tmp_path / "b"]])
    assert r.exit_code == 0 and "not in the prompt" not in r.stderr, r.output


def test_generate_says_which_end_of_a_long_prompt_it_ignores():
    from zoodip_edge.runtime.generate import Generator
    from zoodip_edge.toy import shipped_path

    said: list[str] = []
    g = Generator(shipped_path("bundle"), profile="cpu", warn=lambda m: said.append(m) if "longer" in m else None)
    g.generate("a photo of a red circle", n=1, steps=1, guidance=1.0)
    assert said == []
    g.generate("a photo of a red circle on a white background " * 2 + "on a blue square", n=1, steps=1, guidance=1.0)
    assert len(said) == 1 and "ignored: 'blue square'" in said[0] and "24 tokens" in said[0], said


def test_absurd_safetensors_headers_are_refused(sd1_bundle, tmp_path):
    def craft(name: str, header: dict | bytes, data: bytes = b"\0" * 8, length: int | None = None) -> Path:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
        return path

    files = [
        craft("huge.safetensors", {"<x>": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}),
        craft("negative.safetensors", {"<x>": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}),
        craft("past-end.safetensors", {"<x>": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 2**62]}}),
        craft("length.safetensors", {"<x>": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}}, length=2**62),
        craft("dtype.safetensors", {"<x>": {"dtype": "Q99", "shape": [1, 2], "data_offsets": [0, 8]}}),
        craft("list.safetensors", [1, 2, 3]),  # type: ignore[arg-type]
        craft("binary.safetensors", b"\xff" * 16),
    ]
    for f in files:
        refused(["convert", f, tmp_path / "out.safetensors"], tmp_path, match=str(f.name))
        refused(["generate", sd1_bundle, "--prompt", "a <x>", "--embedding", f, "--out", tmp_path / "g", "--steps", "2"],
                tmp_path, match=str(f.name))
