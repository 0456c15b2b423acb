"""The ``compress`` command line.

    compress MODEL --target TAG [--sparsity S] [--eval DATA] [-o OUT] [...]
    compress run RECIPE.yaml [-o OUT] [--force] [--dry-run]
    compress list passes|targets
    compress explain-target TAG
    compress demo [-o OUT]          # the embedded default model, with its eval data
    compress analyze MODEL --calib DATA [-o DIR] [--executor local|ray]   # per-layer sensitivity table + plot
    compress batch MODEL... --target T[,T2] -o OUTDIR [--executor local|ray]  # models x targets, summary
    compress compare A.onnx B.onnx [--eval DATA]
    compress bench BUNDLE [--device host|qemu-aarch64] [--rpc HOST:PORT [--rpc-key KEY]]
    compress --version

Exit codes: 0 ok, 1 internal error, 2 usage, 3 accuracy gate failed (bundle
written, marked failed), 4 bad input/config, 5 missing dependency.
Errors are one line on stderr; ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from compressor.errors import EXIT_INTERNAL, CompressorError, InputError, UsageError
from compressor.recipe import Options, load_recipe

SUBCOMMANDS = ("run", "list", "explain-target", "demo", "compare", "analyze", "batch", "bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "digits_cnn.onnx"
DEMO_EVAL = REPO_ROOT / "models" / "digits_eval.npz"


def _did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):  # argparse's own check, plus "did you mean" for mistyped flags
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            longs = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for tok in extra:
                if tok.startswith("--") and len(tok) > 2:
                    hint = _did_you_mean(tok.split("=", 1)[0], longs)
                    if hint and hint not in hints:
                        hints.append(hint)
            self.error(f"unrecognized arguments: {' '.join(extra)}{''.join(hints)}")
        return ns


def version() -> str:
    """The installed distribution's version (compressor.__version__ when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("compressor")
    except metadata.PackageNotFoundError:
        from compressor import __version__

        return __version__


def check_args(opts: Options) -> None:
    """The checks of plain values that need no model, data or backend: run before anything heavy
    (onnx, onnxruntime, TVM, torch) is imported, so a bad value fails at once."""
    opts.validate()
    if opts.model and not opts.dry_run:  # a dry run never reads the model
        path = Path(opts.model)
        if not path.exists():
            raise InputError(f"model file not found: {path}")
        if not path.is_file():
            raise InputError(f"model path is not a file: {path}")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _add_run_flags(p: argparse.ArgumentParser, with_model_flags: bool) -> None:
    p.add_argument("-o", "--output", help="bundle directory (default: MODEL.TARGET[.VARIANT].bundle, "
                   "e.g. mine.x86.s90.bundle; see README)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--dry-run", action="store_true", help="print the resolved pipeline and target, run nothing")
    p.add_argument("--save-recipe", metavar="FILE", help="write the resolved recipe to FILE")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="print only warnings, gate failures and the RESULT line")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout when done (status, exit code, bundle, "
                   "sparsity, min cosine, accuracy, warnings, gate failures); progress goes to stderr (none with --quiet)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where fanned-out stages (the --allocation sensitivity sweep) run: local (default) | ray; identical results")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="--executor ray: join this cluster (default: a private local instance for the run)")
    if not with_model_flags:
        return
    p.add_argument("--target", default="x86", help="x86 | arm | cuda (or a variant: x86-avx2, arm64-linux, cuda-sm90)")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of prunable weights set to zero, in [0, 1)")
    p.add_argument("--pattern", default="auto", help="sparsity pattern: auto (the target's default, see explain-target: "
                   "unstructured on the built-in targets) | unstructured | N:M (e.g. 2:4) | RxC blocks (e.g. 1x4, 8x1)")
    p.add_argument("--method", default="auto", help="how weights are chosen for --sparsity: auto (with --calib: obs and wanda "
                   "both run, the better on held-out calibration samples is kept; else magnitude) | magnitude | wanda | obs "
                   "(per layer group the least-error of SparseGPT, the activation mask and that mask with the OBS update) | "
                   "sparsegpt (plain SparseGPT) (wanda/obs/sparsegpt need --calib)")
    p.add_argument("--allocation", default="auto", help="per-layer budget: auto (sensitivity with --calib -- for --structured: "
                   "each channel group's removal measured --, else uniform) | uniform | global | sensitivity")
    p.add_argument("--structured", type=float, default=0.0, help="fraction of prunable channels removed (prune.channels), in [0, 1)")
    p.add_argument("--criterion", default="auto", help="channel score for --structured: auto (obs with --calib, else l1) | "
                                                        "l1 | l2 | fpgm | bn_gamma | apoz | mean_act | taylor | obs")
    p.add_argument("--min-channels", type=int, default=1, help="--structured: channels kept per group at least")
    p.add_argument("--round-to", type=int, default=0, help="--structured: keep channel counts a multiple of this (0: the target's default)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="--structured: refit every layer whose inputs lost channels by least squares on --calib data "
                        "(default: on when --calib is given)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB", help="node/weight name globs left alone by compression passes (pruned channels, sparsity, int8: kept fp32)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="--sparsity: node/weight name globs pruned even where a default rule keeps them dense (stem conv, final classifier)")
    p.add_argument("--quantize", default="none", help="none | int8 | fp16 | int4")
    p.add_argument("--keep-fp32", default=None, help="--quantize: auto (int8's default: with --calib keep the stem, depthwise "
                   "convs, the last layer and the most sensitive layers in fp32) | none (quantize every layer it can)")
    p.add_argument("--pass", dest="passes", action="append", metavar="NAME[:k=v,...]",
                   help="explicit pipeline (repeatable); replaces the default cleanup + flag-driven passes")
    p.add_argument("--calib", help="calibration data .npz (one array per input, samples on axis 0)")
    p.add_argument("--eval", help="evaluation data .npz (inputs + 'labels'); verification uses it too")
    p.add_argument("--finetune", metavar="DATA.npz", help="recovery fine-tuning after pruning: distil from the original model on these inputs (+ optional labels)")
    p.add_argument("--epochs", type=int, default=None,
                   help="--finetune: training epochs, exactly (default: 3, more on small data to reach 100 steps)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224", help="fix dynamic input dims")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py", help="load passes/targets from a Python file")
    p.add_argument("--strict", action="store_true", help="a plugin entry point that fails to load is an error")
    p.add_argument("--check-each-pass", action="store_true", help="onnx.checker + shape inference after every pass")
    p.add_argument("--dump-ir", metavar="DIR", help="write the model after every pass into DIR")
    p.add_argument("--print-pass-times", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip target compilation (reported as a warning)")
    p.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="meta_schedule trials for the dense (fused) TVM functions, spread over them; 0 = untuned (default)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="tuning database root, reused across runs (default ~/.cache/compressor/tuning); applied even with 0 trials")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--no-gate", action="store_true", help="report gate failures but exit 0")
    p.add_argument("--min-cosine", type=float, default=0.99, help="gate: min cosine similarity per output (default 0.99)")
    p.add_argument("--min-top1", type=float, default=0.95, help="gate: min top-1 agreement for classifier outputs (default 0.95)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="gate: max task-accuracy drop with --eval labels (default 0.01)")
    p.add_argument("--search-budget", type=int, default=12,
                   help="when the one-shot result fails the gate: verification rounds of the accuracy search that reverts "
                        "the weights causing most error (default 12; 0 = off)")
    p.add_argument("--verify-samples", type=int, default=16, help="random or --calib samples used for output comparison, and samples kept for the bundle self-check (default 16); with --eval every eval sample is compared")
    p.add_argument("--seed", type=int, default=0)


def _parse_pass_flag(text: str) -> dict:
    name, _, rest = text.partition(":")
    cfg = {}
    for kv in filter(None, rest.split(",")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise UsageError(f"bad --pass {text!r}", hint="use NAME:key=value,key=value")
        import yaml

        cfg[k.strip()] = yaml.safe_load(v)
    return {"name": name.strip(), "config": cfg}


def _options_from_args(a: argparse.Namespace) -> Options:
    return Options(
        model=a.model, target=a.target, output=a.output, sparsity=a.sparsity,
        pattern=a.pattern, method=a.method, allocation=a.allocation, structured=a.structured,
        criterion=a.criterion, min_channels=a.min_channels, round_to=a.round_to, reconstruct=a.reconstruct,
        ignore=a.ignore, include=a.include, quantize=a.quantize, keep_fp32=a.keep_fp32,
        passes=[_parse_pass_flag(t) for t in a.passes] if a.passes else None,
        calib=a.calib, eval=a.eval, finetune=a.finetune, epochs=a.epochs, input_shape=a.input_shape, plugin=a.plugin, force=a.force,
        dry_run=a.dry_run, check_each_pass=a.check_each_pass, dump_ir=a.dump_ir,
        print_pass_times=a.print_pass_times, no_compile=a.no_compile, no_latency=a.no_latency,
        tune_trials=a.tune_trials, tuning_db=a.tuning_db, executor=a.executor, ray_address=a.ray_address,
        no_gate=a.no_gate, min_cosine=a.min_cosine, min_top1=a.min_top1,
        max_accuracy_drop=a.max_accuracy_drop, search_budget=a.search_budget, verify_samples=a.verify_samples, seed=a.seed, strict=a.strict,
    )


def _run(opts: Options, save_recipe: str | None, quiet: bool = False, as_json: bool = False) -> int:
    from compressor import api  # light: api.run checks the plain values (check_args) before anything heavy is imported

    def err(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = err if as_json else _say  # stdout is the JSON object's
    say = (lambda msg: None) if quiet else out
    from compressor import progress

    progress.configure(progress.for_terminal(quiet, as_json))
    res = api.run(opts, say, save_recipe)
    from compressor import report
    if opts.dry_run:
        for line in res.pipeline:
            out(line)
        if as_json:
            _say(json.dumps({"status": "DRY-RUN", "exit_code": 0, "pipeline": res.pipeline}))
        return 0
    rep, code = res.report, res.exit_code
    if not quiet:
        say("")
        for line in report.before_after(rep):
            say(line)
        if rep.get("accuracy"):
            acc = rep["accuracy"]
            extra = f", artifact {acc['artifact']:.4f}" if acc.get("artifact") is not None else ""
            say(f"task accuracy: original {acc['original']:.4f} -> compressed {acc['compressed']:.4f}{extra} ({acc['n']} samples)")
        say("")
        for comp in rep["verification"]:
            for line in report.comparison_lines(comp):
                say(line)
        if opts.print_pass_times:
            say("")
            for line in report.table([[r["name"], f"{r['seconds'] * 1000:.1f} ms"] for r in rep["passes"]], ["pass", "time"]):
                say(line)
    for w in rep["warnings"]:
        out(f"warning: {w}")
    for f in rep["gate"]["failures"]:
        out(f"gate: {f}")
    out(report.result_line(rep))
    if as_json:
        req = report.requested_vs_achieved(rep)
        _say(json.dumps({"status": res.status, "exit_code": code, "bundle": str(res.bundle) if res.bundle else None,
                         "target": rep["target"]["tag"], "sparsity": res.sparsity,
                         "layers_sparsity": None if req is None else {"requested": req[0], "achieved": req[1], "prunable": req[2]},
                         "params": {"original": rep["stats"]["original"]["nonzero_params"],
                                    "compressed": rep["stats"]["compressed"]["nonzero_params"]},
                         "min_cosine": res.min_cosine, "accuracy": res.accuracy, "warnings": res.warnings,
                         "gate_failures": rep["gate"]["failures"], "report": str(Path(str(res.bundle)) / "report.json")}))
    return code


def _cmd_list(args: list[str]) -> int:
    p = _Parser(prog="compress list")
    p.add_argument("what", choices=["passes", "targets"])
    p.add_argument("--plugin", action="append", default=[])
    a = p.parse_args(args)
    from compressor.plugins import load_plugin_file

    for f in a.plugin:
        load_plugin_file(Path(f))
    if a.what == "passes":
        import targets  # noqa: F401  (registers the target lowerings, lower.rnn / lower.sparse)
        from passes import PASSES

        for e in PASSES:
            _say(f"{e.name:<28} {e.obj.description}  [{e.provider}]")
        for w in PASSES.warnings:
            _say(f"warning: {w}")
    else:
        from targets import TARGETS

        for e in TARGETS:
            aliases = f" (aliases: {', '.join(e.obj.aliases)})" if e.obj.aliases else ""
            _say(f"{e.name:<8} {e.obj.description}{aliases}  [{e.provider}]")
        for w in TARGETS.warnings:
            _say(f"warning: {w}")
    return 0


def _cmd_explain(args: list[str]) -> int:
    p = _Parser(prog="compress explain-target")
    p.add_argument("tag")
    a = p.parse_args(args)
    import targets

    _, spec = targets.resolve(a.tag)
    _say(json.dumps(spec.to_dict(), indent=2))
    return 0


def _cmd_run(args: list[str]) -> int:
    p = _Parser(prog="compress run")
    p.add_argument("recipe")
    _add_run_flags(p, with_model_flags=False)
    a = p.parse_args(args)
    _setup_logging(a.verbose)
    opts = load_recipe(Path(a.recipe))
    if a.output:
        opts.output = a.output
    opts.force, opts.dry_run = a.force, a.dry_run
    opts.executor, opts.ray_address = a.executor, a.ray_address  # where it runs: not part of a recipe
    return _run(opts, a.save_recipe, a.quiet, a.json)


def _cmd_compare(args: list[str]) -> int:
    p = _Parser(prog="compress compare")
    p.add_argument("a", help="reference model")
    p.add_argument("b", help="candidate model")
    p.add_argument("--eval", help="data .npz (inputs, optional labels)")
    p.add_argument("--input-shape", action="append", default=[])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(args)
    from compressor import compare, ir, report, verify

    rep = compare.compare_models(Path(a.a), Path(a.b), Path(a.eval) if a.eval else None, a.samples, a.seed,
                                 ir.parse_input_shapes(a.input_shape), verify.Tolerances())
    for line in report.before_after({**rep, "target": {"tag": "-"}}):
        _say(line)
    if rep["accuracy"]:
        _say(f"task accuracy: {rep['accuracy']['original']:.4f} -> {rep['accuracy']['compressed']:.4f} ({rep['accuracy']['n']} samples)")
    for line in report.comparison_lines(rep["verification"][0]):
        _say(line)
    passed = rep["verification"][0]["passed"]
    _say(f"RESULT {'PASSED' if passed else 'FAILED'} compare {a.a} {a.b} data={rep['verification_data']}")
    return 0 if passed else 3


def _cmd_demo(args: list[str]) -> int:
    p = _Parser(prog="compress demo")
    _add_run_flags(p, with_model_flags=True)
    a = p.parse_args(args)
    _setup_logging(a.verbose)
    a.model = str(DEMO_MODEL)
    if a.eval is None:
        a.eval = str(DEMO_EVAL)
    if a.sparsity == 0.0:
        a.sparsity = 0.5
    if a.output is None:
        a.output = "demo.bundle"
    return _run(_options_from_args(a), a.save_recipe)


def _cmd_analyze(args: list[str]) -> int:
    p = _Parser(prog="compress analyze", description="per-layer sensitivity to sparsity: table + sensitivity.png")
    p.add_argument("model")
    p.add_argument("--calib", required=True, help="calibration data .npz (samples on axis 0)")
    p.add_argument("--eval", help="labelled data .npz: measure on it and add task accuracy")
    p.add_argument("-o", "--output", help="directory for sensitivity.png/json (default: MODEL.sensitivity)")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M | RxC")
    p.add_argument("--sparsity", type=float, help="also print the sensitivity allocation for this global sparsity")
    p.add_argument("--samples", type=int, default=64, help="samples used (default 64)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224")
    p.add_argument("--debug", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    from compressor import executor

    executor.add_cli_flags(p)
    a = p.parse_args(args)
    _setup_logging(a.verbose)
    from compressor.sensitivity import run_analyze

    with executor.from_cli(a) as ex:
        return run_analyze(Path(a.model), Path(a.calib), Path(a.output) if a.output else None, _say, a.pattern, a.sparsity,
                           a.samples, Path(a.eval) if a.eval else None, a.input_shape, executor=ex)


def _cmd_batch(args: list[str]) -> int:
    p = _Parser(prog="compress batch", description="compress several models for several targets: one bundle per "
                "model x target under OUTDIR, summary.md/json; re-runs skip unchanged jobs")
    p.add_argument("models", nargs="+", metavar="MODEL")
    _add_run_flags(p, with_model_flags=True)
    from compressor import executor

    executor.add_cli_flags(p, core=False)
    p.set_defaults(target=None)
    a = p.parse_args(args)
    _setup_logging(a.verbose)
    if not a.output:
        raise UsageError("compress batch needs -o OUTDIR")
    if not a.target:
        raise UsageError("compress batch needs --target T[,T2...]")
    if a.save_recipe:
        raise UsageError("--save-recipe is per model: each bundle of a batch keeps its recipe.yaml")
    a.model = a.models[0]
    opts = _options_from_args(a)
    opts.executor, opts.ray_address = "local", None  # the batch's executor runs the jobs; each job's stages run inside its task
    from compressor.batch import run_batch

    with executor.from_cli(a) as ex:
        return run_batch(a.models, a.target, opts, Path(a.output), ex, _say)


def _cmd_bench(args: list[str]) -> int:
    from compressor import device_bench

    p = _Parser(prog="compress bench", description="run a bundle's self-check on a device: pass/fail, timings; "
                "under qemu-aarch64 also executed-instruction counts of the artifact vs its dense twin")
    p.add_argument("bundle")
    p.add_argument("--device", default="host", choices=device_bench.DEVICES)
    p.add_argument("--rpc", metavar="HOST:PORT", help="run and time the artifact on a TVM RPC server instead")
    p.add_argument("--rpc-key", default="", metavar="KEY", help="device key (RPC tracker/proxy)")
    p.add_argument("--no-dense-twin", action="store_true", help="qemu: do not build and count the dense twin")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--debug", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(args)
    _setup_logging(a.verbose)
    code, rep = device_bench.bench(Path(a.bundle), a.device, a.rpc, a.rpc_key, say=_say, twin=not a.no_dense_twin)
    for line in device_bench.report_lines(rep):
        _say(line)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    ratio = (rep.get("insns") or {}).get("dense_over_sparse")
    _say(f"RESULT {'PASSED' if code == 0 else 'FAILED'} bench device={rep['device'].replace(' ', '=')} bundle={a.bundle}"
         + (f" dense_over_sparse_insns={ratio}" if ratio else ""))
    return code


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _looks_like_command(word: str) -> bool:
    """A first argument that is no existing path, has no path separator or suffix, and is close to a
    subcommand: a mistyped subcommand, not a model path."""
    if os.sep in word or "/" in word or "." in word or os.path.exists(word):
        return False
    return bool(difflib.get_close_matches(word, SUBCOMMANDS, n=1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] not in SUBCOMMANDS and "--version" in argv:  # before anything heavy is imported
            _say(f"compress {version()}")
            return 0
        if argv and argv[0] in SUBCOMMANDS:
            cmd, rest = argv[0], argv[1:]
            return {"run": _cmd_run, "list": _cmd_list, "explain-target": _cmd_explain, "demo": _cmd_demo,
                    "compare": _cmd_compare, "analyze": _cmd_analyze, "batch": _cmd_batch, "bench": _cmd_bench}[cmd](rest)
        if argv and not argv[0].startswith("-") and _looks_like_command(argv[0]):
            raise UsageError(f"unknown command {argv[0]!r}{_did_you_mean(argv[0], SUBCOMMANDS)}")
        p = _Parser(prog="compress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--version", action="store_true", help="print the version and exit")
        p.add_argument("model", help="ONNX model file")
        _add_run_flags(p, with_model_flags=True)
        a = p.parse_args(argv)
        _setup_logging(a.verbose)
        return _run(_options_from_args(a), a.save_recipe, a.quiet, a.json)
    except CompressorError as exc:
        if debug:
            traceback.print_exc()
        print(f"compress: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: a bug; one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"compress: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (re-run with --debug)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
