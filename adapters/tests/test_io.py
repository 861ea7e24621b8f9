"""Save / reload of compressed models: bit-exact, strict, versioned, atomic, pickle-free."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lrmath_hf
from lrmath_hf import io as lio
from lrmath_hf.attention import fold_value_output, value_head_dims
from lrmath_hf.io import IncompatibleManifestError, build_skeleton, load_compressed, save_compressed
from lrmath_hf.modules import FactorizedLinear, HeadwiseProjection
from lrmath_hf.specs import get_attention, get_linear, get_spec, set_linear

from ._tiny_models import ARCHS, cache_of, tiny_model, token_batch

F64 = torch.float64


def _svd_factors(weight, rank):
    u, s, vh = torch.linalg.svd(weight.detach().to(F64), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def _compress(model):
    """Every kind of surgery the recipes perform, on a tiny model (values need not be good)."""
    spec = get_spec(model)
    gen = torch.Generator().manual_seed(7)
    # Layer 0: head-wise q/k (pre-RoPE PCA form), V/O fold, factorised MLP (one block-identity).
    for role, heads in (("q", spec.num_heads), ("k", spec.num_kv_heads)):
        dense = get_linear(model, 0, role, spec)
        bases = torch.linalg.qr(torch.randn(heads, spec.head_dim, spec.head_dim, generator=gen, dtype=F64)).Q[..., :12]
        right = torch.einsum("hdr,hdn->hrn", bases, dense.weight.detach().reshape(heads, spec.head_dim, -1))
        bias = None if dense.bias is None else dense.bias.detach()
        set_linear(model, 0, role, HeadwiseProjection.from_factors(bases, right, bias), spec)
    bases = torch.linalg.qr(torch.randn(spec.num_kv_heads, spec.head_dim, spec.head_dim, generator=gen,
                                        dtype=F64)).Q[..., :5]
    fold_value_output(get_attention(model, 0, spec), spec, bases)
    left, right = _svd_factors(get_linear(model, 0, "gate", spec).weight, 8)
    set_linear(model, 0, "gate", FactorizedLinear.from_factors(left, right), spec)
    left, right = _svd_factors(get_linear(model, 0, "down", spec).weight, 10)
    columns = list(range(3, 13))
    junction = right[:, columns]
    set_linear(model, 0, "down", FactorizedLinear.from_factors(
        left @ junction, torch.linalg.solve(junction, right), columns=columns), spec)
    # Layer 1: narrowed MLP (channel selection) as plain, smaller linears.
    keep = torch.arange(0, spec.intermediate_size, 2)
    for role in ("gate", "up"):
        dense = get_linear(model, 1, role, spec)
        narrow = nn.Linear(spec.hidden_size, len(keep), bias=dense.bias is not None, dtype=F64)
        narrow.weight.data = dense.weight.data[keep].clone()
        set_linear(model, 1, role, narrow, spec)
    down = get_linear(model, 1, "down", spec)
    narrow = nn.Linear(len(keep), spec.hidden_size, bias=down.bias is not None, dtype=F64)
    narrow.weight.data = down.weight.data[:, keep].clone()
    set_linear(model, 1, "down", narrow, spec)
    return model


@pytest.fixture(scope="module")
def compressed():
    return {arch: _compress(tiny_model(arch)) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_exact(arch, compressed, tmp_path, monkeypatch):
    model = compressed[arch]
    ids = token_batch(length=11)
    report = {"recipe": "flat", "options": {"ratio": 0.2, "ranks": (12, 5)}, "achieved_ratio": torch.tensor(0.19)}
    folder = save_compressed(model, tmp_path / "saved", report)
    assert sorted(os.listdir(folder)) == ["config.json", "manifest.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["saved"]  # no staging leftovers

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_compressed(folder)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert value_head_dims(loaded) == {0: 5}
    assert type(get_linear(loaded, 0, "q")) is HeadwiseProjection
    assert get_linear(loaded, 0, "down").block_identity
    # The reduced V cache survives the round trip.
    cache = cache_of(loaded(ids, use_cache=True))
    assert cache.layers[0].values.shape[-1] == 5 and cache.layers[1].values.shape[-1] == 16

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == lio.FORMAT_VERSION
    assert set(manifest["versions"]) >= {"lrmath", "torch", "transformers", "safetensors"}
    assert manifest["recipe"] == "flat" and manifest["options"] == {"ratio": 0.2, "ranks": [12, 5]}
    assert manifest["report"]["achieved_ratio"] == pytest.approx(0.19)
    kinds = {name.split("layers.")[1]: entry["kind"] for name, entry in manifest["modules"].items()}
    assert kinds == {
        "0.self_attn.q_proj": "headwise", "0.self_attn.k_proj": "headwise",
        "0.self_attn.v_proj": "linear", "0.self_attn.o_proj": "linear",
        "0.mlp.gate_proj": "factorized", "0.mlp.down_proj": "factorized",
        "1.mlp.gate_proj": "linear", "1.mlp.up_proj": "linear", "1.mlp.down_proj": "linear",
    }
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["columns"] == list(range(3, 13))
    assert manifest["value_head_dims"] == {"0": 5}


def test_generate_after_reload_matches(compressed, tmp_path):
    model = compressed["mistral"]
    loaded = load_compressed(save_compressed(model, tmp_path / "m"))
    prompt = token_batch(seed=2, length=6)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_skeleton_allocates_no_parameters(compressed, tmp_path):
    folder = save_compressed(compressed["qwen2"], tmp_path / "q")
    skeleton, manifest = build_skeleton(folder)
    assert all(p.is_meta for p in skeleton.parameters())
    assert type(get_linear(skeleton, 0, "gate")) is FactorizedLinear
    assert manifest["model_class"] == "Qwen2ForCausalLM"


def test_tied_embeddings_are_stored_once_and_retied(tmp_path):
    model = _compress(tiny_model("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    folder = save_compressed(model, tmp_path / "tied")
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert len({"lm_head.weight", "model.embed_tokens.weight"} & set(handle.keys())) == 1
    loaded = load_compressed(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = token_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_and_device_options(compressed, tmp_path):
    model = compressed["llama"]
    loaded = load_compressed(save_compressed(model, tmp_path / "d"), dtype=torch.float32, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ids = token_batch()
    reference = model(ids).logits
    assert ((loaded(ids).logits.double() - reference).norm() / reference.norm()) < 1e-5


def test_strict_loading_catches_missing_and_unexpected_tensors(compressed, tmp_path):
    folder = save_compressed(compressed["llama"], tmp_path / "s")
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.0.mlp.gate_proj.left"}, str(weights))
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.gate_proj.left"):
        load_compressed(folder)
    save_file({**tensors, "model.layers.0.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_compressed(folder)
    # A manifest that disagrees with the tensors' shapes is caught as well.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["modules"]["model.layers.0.mlp.gate_proj"]["rank"] = 7
    (folder / "manifest.json").write_text(json.dumps(manifest))
    save_file(tensors, str(weights))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_compressed(folder)


def test_incompatible_manifest_is_a_clear_error(compressed, tmp_path):
    folder = save_compressed(compressed["llama"], tmp_path / "v")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": lio.FORMAT_VERSION + 1}))
    with pytest.raises(IncompatibleManifestError, match=r"format version 2 .* reads versions 1\.\.1"):
        load_compressed(folder)
    manifest_path.write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(IncompatibleManifestError, match="something-else"):
        load_compressed(folder)
    manifest_path.unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_compressed(folder)


def test_damaged_folder_is_a_clear_error_and_a_manifest_path_is_accepted(compressed, tmp_path):
    model = compressed["llama"]
    folder = save_compressed(model, tmp_path / "m")
    ids = token_batch(seed=4)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(load_compressed(folder / "manifest.json")(ids).logits, expected)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for cut in (1000, len(data) - 100):  # inside the header, inside the tensor data
        weights.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file .* damaged"):
            load_compressed(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found: the weights the manifest names"):
        load_compressed(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON .* damaged"):
        load_compressed(folder)


def test_interrupted_save_leaves_no_target(compressed, tmp_path, monkeypatch):
    model = compressed["qwen2"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing the manifest")

    monkeypatch.setattr(lio, "_write_json", crash)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, tmp_path / "target")
    assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic_and_opt_in(compressed, tmp_path, monkeypatch):
    first, second = compressed["llama"], compressed["mistral"]
    target = save_compressed(first, tmp_path / "model")
    with pytest.raises(FileExistsError):
        save_compressed(second, target)
    real_save_file = lio.save_file

    def crash(*args, **kwargs):
        real_save_file(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(lio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(second, target, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]
    assert type(load_compressed(target)).__name__ == "LlamaForCausalLM"  # the old model is intact
    monkeypatch.setattr(lio, "save_file", real_save_file)
    save_compressed(second, target, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]
    assert type(load_compressed(target)).__name__ == "MistralForCausalLM"


def test_package_exports_io():
    assert lrmath_hf.save_compressed is save_compressed and lrmath_hf.load_compressed is load_compressed
