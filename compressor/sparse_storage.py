"""Compact storage of sparse weights (the bundle's ``weights.sparse.npz``).

The ONNX file keeps masks as exact zeros in dense initializers (any runtime
can load it). Next to it the bundle stores the same model compactly: one
``.npz`` (zip-deflated) holding the graph without initializer data plus, for
every initializer, the smallest of these encodings:

* ``dense``: the array as is (non-float tensors, small or dense weights);
* ``bitmask``: ``packbits(bits != 0)`` over the flattened tensor + the
  non-zero values (1 bit per entry + values: best at low/medium sparsity);
* ``csr``: 2-D view ``[shape[0], prod(shape[1:])]``: ``values``, column
  ``indices`` and row pointer ``indptr`` in the narrowest unsigned dtype;
* ``bsr``: the same view split into R x C blocks (R x C from ``BLOCKS``) when
  every block is all-zero or kept: ``values[nblocks, R, C]``, block column
  ``indices`` and block-row ``indptr``.

"Zero" means all bits zero, so ``-0.0`` is kept as a value and the round trip
is bit-exact. ``read_sparse_weights(path)`` rebuilds the exact ``ModelProto``
(initializers in their original order, as ``numpy_helper.from_array``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BLOCKS = ((1, 4), (4, 1), (8, 1), (16, 1), (1, 8), (2, 2), (4, 4))
MIN_SPARSE_ELEMENTS = 64


def _uint(maxval: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if maxval <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _nonzero_bits(a: np.ndarray) -> np.ndarray:
    """Entries whose bits are not all zero (so -0.0 counts as a value)."""
    if a.dtype.kind == "f":
        return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}")) != 0
    return a != 0


def _encodings(a: np.ndarray) -> list[tuple[str, dict[str, np.ndarray]]]:
    out: list[tuple[str, dict[str, np.ndarray]]] = [("dense", {"dense": a})]
    if a.dtype.kind != "f" or a.size < MIN_SPARSE_ELEMENTS or a.ndim == 0:
        return out
    nz = _nonzero_bits(a)
    flat, nzf = a.ravel(), nz.ravel()
    out.append(("bitmask", {"bits": np.packbits(nzf), "values": flat[nzf]}))
    rows = a.shape[0] if a.ndim >= 2 else 1
    m2, nz2 = a.reshape(rows, -1), nz.reshape(rows, -1)
    cols = m2.shape[1]
    r_idx, c_idx = np.nonzero(nz2)
    indptr = np.concatenate([[0], np.cumsum(nz2.sum(axis=1))])
    out.append(("csr", {"values": m2[r_idx, c_idx], "indices": c_idx.astype(_uint(max(cols - 1, 0))),
                        "indptr": indptr.astype(_uint(int(indptr[-1])))}))
    for r, c in BLOCKS:
        if rows % r or cols % c:
            continue
        bl = nz2.reshape(rows // r, r, cols // c, c).transpose(0, 2, 1, 3)
        cnt = bl.sum(axis=(2, 3))
        if np.any((cnt != 0) & (cnt != r * c)):
            continue
        br, bc = np.nonzero(cnt)
        vals = m2.reshape(rows // r, r, cols // c, c).transpose(0, 2, 1, 3)[br, bc]
        bptr = np.concatenate([[0], np.cumsum((cnt != 0).sum(axis=1))])
        out.append((f"bsr{r}x{c}", {"values": vals, "indices": bc.astype(_uint(max(cols // c - 1, 0))),
                                    "indptr": bptr.astype(_uint(int(bptr[-1])))}))
    return out


def _decode(enc: str, parts: dict[str, np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if enc == "dense":
        return parts["dense"].reshape(shape)
    size = int(np.prod(shape))
    if enc == "bitmask":
        nz = np.unpackbits(parts["bits"], count=size).astype(bool)
        flat = np.zeros(size, dtype)
        flat[nz] = parts["values"]
        return flat.reshape(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = size // rows if rows else 0
    out = np.zeros((rows, cols), dtype)
    indptr = parts["indptr"].astype(np.int64)
    if enc == "csr":
        row_of = np.repeat(np.arange(rows), np.diff(indptr))
        out[row_of, parts["indices"].astype(np.int64)] = parts["values"]
        return out.reshape(shape)
    if enc.startswith("bsr"):
        r, c = map(int, enc[3:].split("x"))
        view = out.reshape(rows // r, r, cols // c, c).transpose(0, 2, 1, 3)
        brow = np.repeat(np.arange(rows // r), np.diff(indptr))
        view[brow, parts["indices"].astype(np.int64)] = parts["values"]
        return out.reshape(shape)
    raise InputError(f"unknown sparse encoding {enc!r}")


def _nbytes(parts: dict[str, np.ndarray]) -> int:
    return sum(int(p.nbytes) for p in parts.values())


def write_sparse_weights(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    """Write ``model`` compactly to ``path`` (.npz). Returns {"dense_bytes", "stored_bytes", "file", "encodings"}."""
    import zipfile

    from compressor import ir

    path = Path(path)
    skeleton, _ = ir.weightless(model, min_bytes=0)  # the graph without weights: no copy of them
    del skeleton.graph.initializer[:]
    index, counts = [], {}
    tmp = path.with_name(path.name + ".tmp.npz")
    # np.savez_compressed's format (a zip of .npy members), written one initializer at a time: the encoded
    # parts of one tensor in memory at once, not of all
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        def put(name: str, arr: np.ndarray) -> None:
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)

        for i, init in enumerate(model.graph.initializer):
            a = numpy_helper.to_array(init)
            enc, parts = min(_encodings(a), key=lambda e: _nbytes(e[1]))
            counts[enc] = counts.get(enc, 0) + 1
            index.append({"name": init.name, "dtype": a.dtype.str, "shape": list(a.shape), "enc": enc, "parts": sorted(parts)})
            for k, v in parts.items():
                put(f"{i}.{k}", v)
            del a, parts
        meta = {"format": "compressor.sparse_weights", "version": FORMAT_VERSION, "initializers": index}
        put("__meta__", np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        put("__skeleton__", np.frombuffer(skeleton.SerializeToString(), dtype=np.uint8))
    tmp.replace(path)
    return {"dense_bytes": int(ir.model_bytes(model)), "stored_bytes": int(path.stat().st_size), "file": path.name, "encodings": counts}


def read_sparse_weights(path: Path) -> onnx.ModelProto:
    """Rebuild the exact model written by ``write_sparse_weights``."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            model = onnx.ModelProto.FromString(bytes(z["__skeleton__"]))
            if meta.get("format") != "compressor.sparse_weights" or meta.get("version") != FORMAT_VERSION:
                raise InputError(f"{path}: not a compressor sparse-weights file of version {FORMAT_VERSION}")
            inits = []
            for i, e in enumerate(meta["initializers"]):
                parts = {k: z[f"{i}.{k}"] for k in e["parts"]}
                a = _decode(e["enc"], parts, tuple(e["shape"]), np.dtype(e["dtype"]))
                inits.append(numpy_helper.from_array(np.ascontiguousarray(a.astype(np.dtype(e["dtype"]), copy=False)), e["name"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read sparse weights {path}: {type(exc).__name__}: {exc}") from exc
    model.graph.initializer.extend(inits)
    return model
