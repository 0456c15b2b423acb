"""prune.channels on real topologies: models/ and tiny random-weight transformers exports (oracle at 0.3 / 0.5)."""
from __future__ import annotations

import pytest

from models.zoo import ensure_built, shared_cache_dir
from tests.passes.prune_channels_util import zero_then_remove

ZOO = ["mlp", "cnn", "resnet", "mobilenetv2", "densenet", "gru", "lstm", "transformer", "digits"]
UNPRUNABLE = {"gru", "lstm"}  # GRU/LSTM ops have no handler: no seeds (lower.rnn unrolls them only for targets)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    cache = shared_cache_dir(tmp_path_factory)
    return lambda name: ensure_built(name, cache)


@pytest.fixture(scope="session")
def hf_zoo(tmp_path_factory):
    pytest.importorskip("transformers")
    from models.hf_zoo import ensure_built as hf_built

    cache = shared_cache_dir(tmp_path_factory)
    return lambda name: hf_built(name, cache)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", ZOO)
def test_models_zoo(zoo, name, ratio):
    r = zero_then_remove(zoo(name), ratio=ratio, round_to=1)
    if name in UNPRUNABLE:
        assert r["removed"] == 0
    else:
        assert r["removed"] > 0 and r["params"][1] < r["params"][0]


HF = ["hf_bert", "hf_distilbert", "hf_vit", "hf_resnet", "hf_convnext", "hf_mobilenetv2", "hf_efficientnet",
      "hf_regnet", "hf_swin"]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", HF)
def test_transformers_zoo(hf_zoo, name, ratio):
    r = zero_then_remove(hf_zoo(name), ratio=ratio, round_to=1)
    assert r["removed"] > 0 and r["params"][1] < r["params"][0]
    if name in ("hf_bert", "hf_distilbert", "hf_vit"):  # whole heads pruned: Q, K, V and out-proj consistent
        heads = [s for s in r["plan"].group_stats if s["status"] == "pruned" and s["channels_before"] == 4]
        assert len(heads) == 2 and all(s["channels_after"] < 4 for s in heads)
    if name == "hf_swin":  # window attention: its Reshape shapes are folded to constants at load (ir.load)
        heads = sorted((s["channels_before"], s["channels_after"]) for s in r["plan"].group_stats
                       if s["status"] == "pruned" and s["channels_before"] in (2, 4))
        assert heads == [(n, n - round(ratio * n)) for n in (2, 4)]
