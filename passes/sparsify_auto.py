"""``sparsify.auto``: the data-aware one-shot method that fits *this* model, chosen on held-out data.

Neither data-aware criterion wins everywhere. Measured on the real suite at 50% with the same
(sensitivity) allocation: OBS/SparseGPT's weight reconstruction keeps a compact MobileNetV3 classifier
at accuracy 0.86 where Wanda's mask alone falls further, while on magika (a byte-level CNN) Wanda
keeps 0.985 of the dense model's decisions and OBS 0.973 -- OBS fits the calibration samples'
activations and can lose on others. So with calibration data the default runs every candidate
(``candidates``, default OBS and Wanda) on the same graph and the same calibration samples minus a
held-out quarter, measures each result's relative output error against the dense model on that held-out
quarter, and keeps the best. The report (``method_choice``) lists every candidate's error and the
winner; the winner's own statistics (per-layer sparsities, allocation, reconstruction errors) are the
pass's statistics. The sensitivity sweep of the allocation is shared between candidates (same graph,
same samples, same Wanda-score probes: ``sparsity_patterns.plan_sparsities`` caches it).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compressor import runtime
from compressor.errors import UsageError
from compressor.metrics import rel_error
from compressor.pass_base import Pass, PassContext, PassResult, make_config
from passes.quant_common import replace_graph
from passes.sparsity_patterns import SparsifyConfig, calib_feeds

log = logging.getLogger(__name__)

CANDIDATES = ("obs", "wanda", "magnitude")


@dataclass(frozen=True)
class AutoSparsifyConfig(SparsifyConfig):
    candidates: tuple[str, ...] = ("obs", "wanda")
    holdout: int = 4  # every holdout-th calibration sample scores the candidates (none trains them)
    damp: float = 0.01  # obs
    block_size: int = 128  # obs
    variants: tuple[str, ...] = ("obs", "act", "act_update")  # obs: per-group candidate solutions

    def __post_init__(self):
        super().__post_init__()
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if not self.candidates or bad:
            raise UsageError(f"sparsify.auto candidates must be among {', '.join(CANDIDATES)}, got {list(self.candidates)}")
        if self.holdout < 2:
            raise UsageError(f"sparsify.auto holdout must be >= 2, got {self.holdout}")


class AutoSparsify(Pass):
    name = "sparsify.auto"
    description = ("data-aware one-shot sparsity: OBS and Wanda (same allocation) on the calibration data, the one "
                   "with the smaller output error on held-out calibration samples kept (needs --calib)")
    Config = AutoSparsifyConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from compressor.data import Samples
        from passes import PASSES

        cfg: AutoSparsifyConfig = self.config
        feeds = calib_feeds(ctx, cfg, self.name)
        if len(feeds) >= 2 * cfg.holdout:
            held = feeds[cfg.holdout - 1::cfg.holdout]
            fit = [f for i, f in enumerate(feeds) if i % cfg.holdout != cfg.holdout - 1]
        else:  # too few to hold any out: score on the fitting samples (says so)
            held, fit = feeds, feeds
        base = ctx.export(graph)
        ref = runtime.run_all(runtime.session(base), held)
        sub = dataclasses.replace(ctx, calib=Samples(fit, None, getattr(ctx.calib, "source", "calib"), []))
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SparsifyConfig)}
        shared["calib_samples"] = 0  # the subset is already cut
        tried: dict[str, tuple[float, PassResult, object]] = {}
        for name in cfg.candidates:
            cls = PASSES.get(f"sparsify.{name}")
            own = {f.name for f in dataclasses.fields(cls.Config)}
            values = {k: v for k, v in shared.items() if k in own}
            if name == "obs":
                values.update(damp=cfg.damp, block_size=cfg.block_size, variants=list(cfg.variants))
            g = gs.import_onnx(base)
            res = cls(make_config(cls, values)).run(g, sub)
            model = sub.export(g)
            err = rel_error(runtime.run_all(runtime.session(model), held), ref)
            tried[name] = (err, res, model)
            log.info("sparsify.auto: %s held-out relative output error %.6g", name, err)
        best = min(tried, key=lambda n: (tried[n][0], cfg.candidates.index(n)))
        err, res, model = tried[best]
        replace_graph(graph, model)
        stats = dict(res.stats)
        stats["method_choice"] = {
            "chosen": best, "metric": "relative output error vs the dense model on held-out calibration samples",
            "errors": {n: round(v[0], 8) for n, v in tried.items()}, "held_out": len(held) if held is not fit else 0,
            "fit_samples": len(fit)}
        warnings = list(res.warnings)
        if held is fit:
            warnings.append(f"only {len(feeds)} calibration samples: the methods were compared on the samples they were "
                            "fitted on (give at least 8 for a held-out comparison)")
        return PassResult(res.modified, stats, warnings)
