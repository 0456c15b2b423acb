"""Model zoo for compressor tests and benchmarks (run from the repo root; not installed).

* ``models.build``        - seeded torch builders exported to ONNX (``python -m models.build``)
* ``models.train_digits`` - trains the embedded default ``digits_cnn.onnx`` (``python -m models.train_digits``)
* ``models.zoo``          - ``ensure_built(name, cache_dir)`` build-once cache for tests
"""
