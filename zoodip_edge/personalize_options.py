"""``personalize``'s arguments and options as data.

The CLI builds the command's parameters from this table and ``personalize-many`` reads its job
keys from it, so a job file accepts exactly what the command does. Plain data: importing it
loads neither typer nor ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .profiles import builtin_profiles

REQUIRED: Any = ...  # typer's marker for a parameter without a default

# Help texts list what the registries hold: the device profiles shipped in devices/.
DEVICE_CHOICES = " | ".join(["auto", *builtin_profiles(), "path/to/profile.toml"])


@dataclass(frozen=True)
class Param:
    """One parameter of ``personalize``: its Python name, value kind, help text and CLI spelling."""

    name: str
    kind: str  # "path", "str", "int", "float" or "bool"
    help: str
    default: Any = REQUIRED
    decls: tuple[str, ...] = ()  # typer's declarations when not the default --name-with-dashes
    argument: bool = False  # positional

    @property
    def flag(self) -> str | None:
        """The option's ``--flag`` (the "on" one of --x/--no-x); None for an argument."""
        if self.argument:
            return None
        longs = [d for d in self.decls if d.startswith("--")]
        return (longs[0] if longs else "--" + self.name.replace("_", "-")).partition("/")[0]

    @property
    def off_flag(self) -> str | None:
        """``--no-x`` of a ``--x/--no-x`` option, else None."""
        longs = [d for d in self.decls if d.startswith("--")]
        return (longs[0].partition("/")[2] or None) if longs else None

    @property
    def key(self) -> str:
        """The name a job file uses: the option's own ("format"), not the parameter's ("fmt")."""
        return self.name if self.flag is None else self.flag[2:].replace("-", "_")


PERSONALIZE: tuple[Param, ...] = (
    Param("bundle", "path", "bundle folder made by `zoodip-edge export`", argument=True),
    Param("images", "path", "folder of 3-5 photos of the concept", argument=True),
    Param("token", "str", "the new token, e.g. '<my-dog>'"),
    Param("init", "str", "a one-token word to start from, e.g. 'dog'"),
    Param("out", "path", "learned embedding file (.safetensors)", decls=("--out", "-o")),
    Param("steps", "str", "total optimization steps (default: the bundle's, 30000 for SD1.5), or "
          "'auto': stop when held-out probes stop improving (at most the default)", None),
    Param("search_init", "bool", "start from the vocabulary word (or mix of the best three) that best explains the "
          "photos, found with forward passes (default: the bundle's)", None, ("--search-init/--no-search-init",)),
    Param("seed", "int", "random seed: same seed, same result", 0),
    Param("captions", "path", "JSON mapping image file name -> caption with {} for the token", None),
    Param("templates", "str", "textual-inversion templates when no captions: object | style", "object"),
    Param("device", "str", DEVICE_CHOICES, "auto"),
    Param("strict", "bool", "refuse to fall back to CPU when a requested provider is missing", False, ("--strict",)),
    Param("batched", "bool", "run the n+1 perturbations as one batch or one by one (default: profile)", None,
          ("--batched/--sequential",)),
    Param("n", "int", "perturbations per step", None, ("--n",)),
    Param("mu", "float", "perturbation size", None),
    Param("lr", "float", "ZOAdam learning rate", None),
    Param("tau", "int", "Subspace Gradient buffer length", None),
    Param("nu", "float", "Subspace Gradient variance threshold", None),
    Param("t_low", "int", "PUTS lower timestep (inclusive)", None),
    Param("t_high", "int", "PUTS upper timestep (exclusive)", None),
    Param("guide_vocab", "int", "also perturb along the K principal directions of the token table "
          "(0: off; default: the bundle's)", None),
    Param("guide_encoder", "int", "also perturb along the K directions the text encoder's output responds to most, "
          "read every 250 steps at the current token (0: off; default: the bundle's; SD1/SD2)", None),
    Param("no_subspace", "bool", "ablation: disable the Subspace Gradient", False, ("--no-subspace",)),
    Param("no_puts", "bool", "ablation: sample t uniformly from all timesteps", False, ("--no-puts",)),
    Param("checkpoint_every", "int", "write a checkpoint every K steps (0: only at the end / on Ctrl-C)", 100),
    Param("checkpoint", "path", "checkpoint file (default: OUT with .ckpt appended)", None),
    Param("resume", "bool", "continue from the checkpoint", False, ("--resume",)),
    Param("fmt", "str", "diffusers | a1111", "diffusers", ("--format",)),
    Param("init_embedding", "path", "start from an existing embedding file (continue training)", None),
    Param("preview_every", "int", "write a preview image beside the checkpoint every K steps (0: off)", 0),
    Param("log_jsonl", "path", "write one JSON record per step (replayable)", None),
    Param("quiet", "bool", "no progress bar", False, ("--quiet", "-q")),
    Param("force", "bool", "replace OUT, the log, and a checkpoint of another run (never a file that is not a "
          "checkpoint)", False, ("--force",)),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PERSONALIZE}

# Options personalize-many sets itself: the checkpoint lives in the job folder, retries resume, and
# nothing it does replaces a file it did not write.
MANAGED = ("checkpoint", "resume", "force", "quiet", "log_jsonl")


def job_keys() -> dict[str, Param]:
    """The keys a personalize-many job may set, by job-file name (``format``, not ``fmt``)."""
    return {p.key: p for p in PERSONALIZE if p.key not in MANAGED}
