"""Options and recipes.

``Options`` is the single resolved form of a run: the CLI fills it from flags,
``compress run recipe.yaml`` from a versioned YAML whose keys mirror the CLI
flags (kebab-case, e.g. ``input-shape``, ``check-each-pass``). The bundle stores
the fully resolved recipe (``recipe.yaml``), which ``compress run`` accepts.

    version: 1
    model: digits_cnn.onnx        # relative paths are relative to the recipe file
    target: x86
    sparsity: 0.5
    output: out/digits
    passes:                       # optional; default: cleanup + what the flags ask for
      - cleanup.fold_batchnorm
      - name: sparsify.magnitude
        config: {sparsity: 0.5}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressor.errors import InputError, UsageError

RECIPE_VERSION = 1


@dataclass
class Options:
    model: str | None = None
    target: str = "x86"
    output: str | None = None
    sparsity: float = 0.0
    pattern: str = "auto"  # auto (the target's preferred_pattern) | unstructured | N:M (2:4) | RxC blocks (1x4, 8x1)
    method: str = "auto"  # sparsify.<method>: auto (with --calib: obs vs wanda on held-out data, else magnitude) | magnitude | wanda | obs | sparsegpt
    allocation: str = "auto"  # auto (sensitivity with --calib for --sparsity, else uniform) | uniform | global | sensitivity
    structured: float = 0.0  # prune.channels ratio
    criterion: str = "auto"  # prune.channels criterion (auto: obs with calibration data, else l1)
    min_channels: int = 1
    round_to: int = 0  # 0 = the target's default channel multiple
    reconstruct: bool | None = None  # None: on when calibration data is given
    ignore: list[str] = field(default_factory=list)  # name globs left alone by pruning/sparsity passes
    include: list[str] = field(default_factory=list)  # name globs sparsified despite default exclusions (stem, classifier)
    quantize: str = "none"  # none | int8 | fp16 | int4
    keep_fp32: str | None = None  # none | auto (mixed precision by sensitivity); None: the pass's default
    passes: list[dict[str, Any]] | None = None  # explicit pipeline [{name, config}]
    calib: str | None = None
    eval: str | None = None
    finetune: str | None = None  # --finetune DATA.npz: recovery fine-tuning (finetune.distill)
    epochs: int | None = None  # --epochs for --finetune (None: the pass's default, at least 100 steps)
    input_shape: list[str] = field(default_factory=list)
    plugin: list[str] = field(default_factory=list)
    force: bool = False
    dry_run: bool = False
    check_each_pass: bool = False
    dump_ir: str | None = None
    print_pass_times: bool = False
    no_compile: bool = False
    tune_trials: int = 0  # meta_schedule trials for the TVM artifact's dense functions (0 = untuned)
    tuning_db: str | None = None  # tuning database root (default: per-user cache), host-specific: not in recipes
    executor: str = "local"  # local | ray: where fanned-out stages (the sensitivity sweep) run; results identical, not in recipes
    ray_address: str | None = None  # --executor ray: cluster HOST:PORT (default: a private instance), host-specific: not in recipes
    no_latency: bool = False
    no_gate: bool = False
    min_cosine: float = 0.99
    min_top1: float = 0.95
    max_accuracy_drop: float = 0.01
    search_budget: int = 12  # accuracy search: verification rounds when the one-shot result fails the gate (0 = off)
    verify_samples: int = 16
    seed: int = 0
    strict: bool = False

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.structured < 1.0:
            raise UsageError(f"--structured must be in [0, 1), got {self.structured}")
        if self.method not in ("auto", "magnitude", "wanda", "obs", "sparsegpt"):
            raise UsageError(f"--method must be auto, magnitude, wanda, obs or sparsegpt, got {self.method!r}",
                             hint="other sparsify passes (plugins) go in with --pass NAME")
        if self.quantize not in ("none", "int8", "fp16", "int4"):
            raise UsageError(f"--quantize must be none, int8, fp16 or int4, got {self.quantize!r}")
        if self.keep_fp32 not in (None, "none", "auto"):
            raise UsageError(f"--keep-fp32 must be none or auto, got {self.keep_fp32!r}")
        if self.allocation not in ("auto", "uniform", "global", "sensitivity"):
            raise UsageError(f"--allocation must be auto, uniform, global or sensitivity, got {self.allocation!r}")
        if self.min_channels < 1 or self.round_to < 0:
            raise UsageError("--min-channels must be >= 1 and --round-to >= 0")
        for name in ("min_cosine", "min_top1"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [-1, 1], got {v}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise UsageError(f"--max-accuracy-drop must be in [0, 1], got {self.max_accuracy_drop}")
        if self.epochs is not None and self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if self.tune_trials < 0:
            raise UsageError(f"--tune-trials must be >= 0, got {self.tune_trials}")
        if self.search_budget < 0:
            raise UsageError(f"--search-budget must be >= 0, got {self.search_budget}")
        if self.verify_samples < 1:
            raise UsageError(f"--verify-samples must be >= 1, got {self.verify_samples}")
        if self.executor not in ("local", "ray"):
            raise UsageError(f"--executor must be local or ray, got {self.executor!r}")
        if self.ray_address and self.executor != "ray":
            raise UsageError("--ray-address needs --executor ray")


# keys that describe where/how a run happens rather than what it computes: not stored in a recipe
_NOT_IN_RECIPE = {"dry_run", "force", "tuning_db", "executor", "ray_address"}
_PATH_KEYS = ("model", "calib", "eval", "output", "dump_ir", "finetune")


def normalize_passes(items: Any) -> list[dict[str, Any]]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise InputError("recipe 'passes' must be a list")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append({"name": item, "config": {}})
        elif isinstance(item, dict) and "name" in item:
            extra = set(item) - {"name", "config"}
            if extra:
                raise InputError(f"recipe pass entry has unknown keys: {', '.join(sorted(extra))}")
            out.append({"name": str(item["name"]), "config": dict(item.get("config") or {})})
        elif isinstance(item, dict) and len(item) == 1:
            (name, cfg), = item.items()
            out.append({"name": str(name), "config": dict(cfg or {})})
        else:
            raise InputError(f"recipe pass entry not understood: {item!r}")
    return out


def load_recipe(path: Path) -> Options:
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a YAML mapping")
    version = data.pop("version", None)
    if version != RECIPE_VERSION:
        raise InputError(f"recipe {path}: unsupported version {version!r}", hint=f"this compressor reads version {RECIPE_VERSION}")
    fields = {f.name: f for f in dataclasses.fields(Options)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        attr = key.replace("-", "_")
        if attr not in fields or attr in _NOT_IN_RECIPE:
            raise InputError(f"recipe {path}: unknown key {key!r}")
        kwargs[attr] = value
    if "passes" in kwargs:
        kwargs["passes"] = normalize_passes(kwargs["passes"])
    base = path.parent
    for key in _PATH_KEYS:
        if kwargs.get(key):
            kwargs[key] = str((base / str(kwargs[key])))
    kwargs["plugin"] = [str(base / p) for p in kwargs.get("plugin") or []]
    for key in ("input_shape", "plugin", "ignore", "include"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    try:
        opts = Options(**kwargs)
    except TypeError as exc:
        raise InputError(f"recipe {path}: {exc}") from exc
    for f in dataclasses.fields(Options):
        v = getattr(opts, f.name)
        if f.type in ("float",) and isinstance(v, int) and not isinstance(v, bool):
            setattr(opts, f.name, float(v))
        if f.type == "float" and not isinstance(getattr(opts, f.name), float):
            raise InputError(f"recipe {path}: {f.name.replace('_', '-')} must be a number")
        if f.type == "bool" and not isinstance(v, bool):
            raise InputError(f"recipe {path}: {f.name.replace('_', '-')} must be true or false")
    return opts


def to_recipe(opts: Options, resolved_passes: list[dict[str, Any]], base: Path) -> dict[str, Any]:
    """The resolved recipe: every option, kebab-case, with the explicit pass list.
    Paths are written relative to ``base`` (the folder the recipe is saved in)."""
    d: dict[str, Any] = {"version": RECIPE_VERSION}
    for f in dataclasses.fields(Options):
        if f.name in _NOT_IN_RECIPE or f.name == "passes":
            continue
        v = getattr(opts, f.name)
        if f.name in _PATH_KEYS and v:
            v = os.path.relpath(Path(v).resolve(), base.resolve())
        elif f.name == "plugin":
            v = [os.path.relpath(Path(p).resolve(), base.resolve()) for p in v]
        d[f.name.replace("_", "-")] = v
    d["passes"] = resolved_passes
    return d


def dump_recipe(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)
