"""Human-readable rendering of a run report (terminal tables and report.md).

The report itself is a plain dict built by the pipeline (report.json); this
module only formats it.
"""
from __future__ import annotations

from typing import Any


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.3f} ms"


def _ratio(a, b) -> str:
    if not a or b is None:
        return "-"
    return f"{b / a:.3f}x"


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def tuning_note(report: dict[str, Any]) -> str:
    """', tuned 64 new trials, 3/3 functions with records, 0 reused' / ', untuned' for the artifact latency row."""
    tun = (report.get("artifact") or {}).get("tuning")
    if not tun:
        return ""
    if tun.get("mode") == "untuned":
        return ", untuned"
    where = ""
    if tun.get("executor", "local") != "local":
        where = f" on {tun['executor']} ({tun.get('workers', 1)} workers)"
    return (f", tuned {tun.get('trials_run', 0)} new trials{where}, {tun.get('records_applied', 0)}/{tun.get('tasks', 0)} "
            f"functions with records, {tun.get('tasks_reused', 0)} reused")


def before_after(report: dict[str, Any]) -> list[str]:
    b, a = report["stats"]["original"], report["stats"]["compressed"]
    lat = report.get("latency") or {}
    rows = [
        ["parameters", _fmt_int(b["params"]), _fmt_int(a["params"]), _ratio(b["params"], a["params"])],
        ["non-zero parameters", _fmt_int(b["nonzero_params"]), _fmt_int(a["nonzero_params"]), _ratio(b["nonzero_params"], a["nonzero_params"])],
        ["sparsity", f"{b['sparsity']:.1%}", f"{a['sparsity']:.1%}", ""],
        ["bytes on disk (onnx)", _fmt_bytes(b["bytes_on_disk"]), _fmt_bytes(a["bytes_on_disk"]), _ratio(b["bytes_on_disk"], a["bytes_on_disk"])],
    ]
    if report.get("sparse_storage"):
        st = report["sparse_storage"]["stored_bytes"]
        rows.append(["bytes stored (sparse)", _fmt_bytes(b["bytes_on_disk"]), _fmt_bytes(st), _ratio(b["bytes_on_disk"], st)])
    rows += [
        ["MACs", _fmt_int(b["macs"]), _fmt_int(a["macs"]), _ratio(b["macs"], a["macs"])],
    ]
    if lat.get("ort_original_s") is not None:
        rows.append(["latency onnxruntime", _fmt_ms(lat["ort_original_s"]), _fmt_ms(lat["ort_compressed_s"]), _ratio(lat["ort_original_s"], lat["ort_compressed_s"])])
    if lat.get("artifact_s") is not None:
        rows.append([f"latency {report['target']['tag']} artifact (TVM{tuning_note(report)})", "-", _fmt_ms(lat["artifact_s"]), _ratio(lat["ort_original_s"], lat["artifact_s"]) + " of ORT original"])
    ops = sorted(set(b["op_counts"]) | set(a["op_counts"]))
    for op in ops:
        nb, na = b["op_counts"].get(op, 0), a["op_counts"].get(op, 0)
        rows.append([f"op {op}", str(nb), str(na), "" if nb == na else f"{na - nb:+d}"])
    return table(rows, ["", "original", "compressed", "ratio"])


def comparison_lines(comp: dict[str, Any]) -> list[str]:
    head = f"{comp['candidate']} vs {comp['reference']} ({comp['kind']} gate, {comp['n_samples']} samples): {'PASS' if comp['passed'] else 'FAIL'}"
    rows = []
    for o in comp["outputs"]:
        rows.append([
            o["name"], f"{o['max_abs']:.3g}", f"{o['mean_abs']:.3g}", f"{o['p99_abs']:.3g}",
            f"{o['max_rel']:.3g}", f"{o['p99_rel']:.3g}", f"{o['cosine']:.6f}",
            "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.3f}",
        ])
    lines = [head] + table(rows, ["output", "max abs", "mean abs", "p99 abs", "max rel", "p99 rel", "cosine", "top-1 agree"])
    lines += [f"  gate failure: {f}" for f in comp["failures"]]
    return lines


def requested_vs_achieved(report: dict[str, Any]) -> tuple[float, float, int] | None:
    """(requested, achieved, prunable weights) of the run's sparsify pass, over the layers it prunes: the
    whole-model ``sparsity`` also counts the layers left dense (stem, classifier, --ignore, embeddings).
    After an accuracy search that gave weights back, ``achieved`` is the search's final figure."""
    sp = [p for p in report.get("passes", []) if p.get("name", "").startswith("sparsify.")
          and "requested_sparsity" in (p.get("stats") or {})]
    if not sp:
        return None
    st = sp[-1]["stats"]
    achieved = st.get("achieved_sparsity", st["requested_sparsity"])
    search = report.get("search") or {}
    if search.get("kind") == "values" and search.get("rounds") and search.get("zeros_after") is not None:
        achieved = search["zeros_after"]
    return float(st["requested_sparsity"]), float(achieved), int(st.get("prunable_params") or 0)


def result_line(report: dict[str, Any]) -> str:
    a, b = report["stats"]["compressed"], report["stats"]["original"]
    acc = report.get("accuracy") or {}
    parts = [
        f"RESULT {report['status']}",
        f"target={report['target']['tag']}",
        f"sparsity={a['sparsity']:.3f}",
        f"params={a['nonzero_params']}/{b['nonzero_params']}",
    ]
    req = requested_vs_achieved(report)
    if req:
        parts.append(f"layers_sparsity={req[1]:.3f}/{req[0]:.3f}")
    if acc:
        parts.append(f"accuracy={acc['original']:.4f}->{acc['compressed']:.4f}")
    worst = [c for c in report["verification"] if c["kind"] == "lossy"]
    if worst:
        parts.append(f"min_cosine={min(o['cosine'] for c in worst for o in c['outputs']):.6f}")
    parts.append(f"warnings={len(report['warnings'])}")
    parts.append(f"bundle={report['bundle']}")
    return " ".join(parts)


def why_not_faster(report: dict[str, Any]) -> list[str]:
    """The report section that says where the zeros bring no speed: every layer a target lowering kept
    dense (with its reason: the cost model's predicted ratio, an op without a sparse kernel), the runtime
    the bundle chose and why, and the measured latencies side by side."""
    req = requested_vs_achieved(report)
    kept = [(p["name"], lay) for p in report.get("target_passes") or [] for lay in (p["stats"].get("layers") or [])
            if isinstance(lay, dict) and not lay.get("lowered", True)]
    lowered = [lay for p in report.get("target_passes") or [] for lay in (p["stats"].get("layers") or [])
               if isinstance(lay, dict) and lay.get("lowered")]
    in_table = {lay.get("node") for _, lay in kept}
    dense_why = [w for p in report.get("target_passes") or [] for w in p.get("warnings", [])
                 if ("kept dense" in w or "not lowered" in w) and w.split(":", 1)[0] not in in_table]
    if not (req or kept or dense_why):
        return []
    out = ["", "## Why not faster", ""]
    if req:
        out.append(f"- sparsity over the pruned layers: {req[1]:.3f} (requested {req[0]:.3f}, {req[2]} prunable weights); "
                   f"whole model {report['stats']['compressed']['sparsity']:.3f} (layers left dense count too)")
    out.append(f"- sparse kernels: {len(lowered)} layer(s) lowered, {len(kept) + len(dense_why)} kept dense")
    rows = [[lay.get("node", "?"), lay.get("op", ""), "x".join(map(str, lay.get("shape", []))),
             f"{lay['sparsity']:.0%}" if isinstance(lay.get("sparsity"), (int, float)) else "",
             f"{lay['predicted_ratio']:.2f}x" if isinstance(lay.get("predicted_ratio"), (int, float)) else "",
             str(lay.get("reason") or lay.get("cost_model") or "")] for _, lay in kept]
    out += [f"  - {w}" for w in dense_why]  # no sparse kernel for the op / shape
    if rows:
        out += ["", "Kept dense by the cost model (its predicted speedup below the lowering's minimum):", ""]
        out += table(rows, ["layer", "op", "shape", "zeros", "predicted speedup", "cost model"]) + [""]
    rt = report.get("runtime")
    if rt:
        out.append(f"- runtime: {rt['name']} ({rt['reason']})")
    lat = report.get("latency") or {}
    if lat.get("ort_original_s"):
        vals = [f"onnxruntime original {lat['ort_original_s'] * 1e3:.3f} ms"]
        if lat.get("ort_compressed_s"):
            vals.append(f"onnxruntime compressed {lat['ort_compressed_s'] * 1e3:.3f} ms")
        if lat.get("artifact_s"):
            vals.append(f"artifact {lat['artifact_s'] * 1e3:.3f} ms")
        out.append(f"- measured: {', '.join(vals)} ({lat.get('measured_on', '?')})")
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# compressor report: {report['model']['path']}", "",
             f"Status: **{report['status']}**  ", f"Target: `{report['target']['tag']}` ({report['target']['tvm_target']})  ",
             (f"Runtime the bundle uses: **{report['runtime']['name']}** ({report['runtime']['reason']})  " if report.get("runtime") else ""),
             f"Verification data: {report['verification_data']}" + (" (random: weak evidence)" if report['verification_data'].startswith('random') else ""),
             "", "## Before / after", ""]
    lines += before_after(report)
    if report.get("accuracy"):
        acc = report["accuracy"]
        lines += ["", "## Task accuracy", "", f"original {acc['original']:.4f}, compressed {acc['compressed']:.4f} "
                  f"(drop {acc['original'] - acc['compressed']:+.4f}, limit {acc['max_drop']}) on {acc['n']} labelled samples"
                  + (f"; artifact {acc['artifact']:.4f}" if acc.get("artifact") is not None else "")]
    lines += ["", "## Verification", ""]
    for comp in report["verification"]:
        lines += comparison_lines(comp) + [""]
    lines += ["## Passes", ""]
    lines += table([[p["name"], "yes" if p["modified"] else "no", f"{p['seconds'] * 1000:.1f} ms",
                     ", ".join(f"{k}={v}" for k, v in p["stats"].items() if isinstance(v, (int, float, str)))]
                    for p in report["passes"]], ["pass", "changed", "time", "stats"])
    tps = report.get("target_passes") or []
    if tps:
        lines += ["", f"## Target passes ({report['target']['tag']})", ""]
        lines += table([[p["name"], "yes" if p["modified"] else "no", f"{p['seconds'] * 1000:.1f} ms",
                         ", ".join(f"{k}={v}" for k, v in p["stats"].items() if isinstance(v, (int, float, str)))]
                        for p in tps], ["pass", "changed", "time", "stats"])
    lines += why_not_faster(report)
    art = report.get("artifact")
    lines += ["", "## Artifact", ""]
    lines.append(f"`{art['path']}` ({art['kind']}), sha256 `{art['sha256']}`" if art else "no artifact produced (see warnings)")
    kernels = (art or {}).get("kernels")
    for k in (kernels.get("rnn_fused", []) if isinstance(kernels, dict) else []):
        lines.append(f"- fused {k['cell']} kernel `{k['node']}`: {k['steps']} steps x {k['directions']} direction(s), "
                     f"batch {k['batch']}, input {k['input']}, hidden {k['hidden']}; W {k['modes'][0]} "
                     f"({k['stored_w']:.0%} of segments stored), R {k['modes'][1]} ({k['stored_r']:.0%})")
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in report["warnings"]] or ["none"])
    if report.get("latency"):
        lines += ["", f"Latency measured on: {report['latency'].get('measured_on', '?')}"]
    return "\n".join(lines) + "\n"
