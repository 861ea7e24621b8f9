"""ViT / DeiT / DINOv2 specs: declared layout matches transformers 5.x, full-rank surgery is exact, save / reload is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lrmath_hf.specs_vision  # noqa: F401  registers the encoder families
import transformers
from lrmath_hf.io import load_compressed, save_compressed
from lrmath_hf.modules import FactorizedLinear
from lrmath_hf.specs import get_linear, get_spec, iter_layers, linear_name, set_linear
from lrmath_hf.specs_vision import FINAL_NORMS, final_norm, mlp_width, sync_mlp_width

from ._tiny_models import randomize

F64 = torch.float64
VISION_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   image_size=56, patch_size=14)
# (model_type, class name): bare backbones and models with a head, as users load them.
VISION_CLASSES = (
    ("vit", "ViTModel"), ("vit", "ViTForImageClassification"),
    ("deit", "DeiTModel"), ("deit", "DeiTForImageClassificationWithTeacher"),
    ("dinov2", "Dinov2Model"), ("dinov2", "Dinov2ForImageClassification"),
)
_CONFIGS = {"vit": "ViTConfig", "deit": "DeiTConfig", "dinov2": "Dinov2Config"}


def tiny_vision_model(arch: str = "dinov2", cls: str | None = None, *, seed: int = 0, dtype=F64, **overrides):
    """A randomised 2-layer ``arch`` encoder (hidden 64, MLP 128, 56 px, 4 x 4 patches) in eval mode."""
    config = getattr(transformers, _CONFIGS[arch])(**{**VISION_DIMS, "num_labels": 3, **overrides})
    if arch == "dinov2":
        config.layerscale_value = 0.5  # a layer scale other than 1 exercises the block's own scaling
        config.mlp_ratio = config.intermediate_size // config.hidden_size  # DINOv2 builds fc1 from this
    cls = cls or {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model"}[arch]
    model = sync_mlp_width(getattr(transformers, cls)(config))
    return randomize(model.to(dtype), seed).eval()


def pixel_batch(n: int = 3, size: int = 56, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _features(model, pixels):
    return model.base_model(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("arch,cls", VISION_CLASSES)
def test_spec_matches_built_modules(arch, cls):
    model = tiny_vision_model(arch, cls)
    spec = get_spec(model)
    assert (spec.kind, spec.mlp_kind, spec.rope, spec.causal) == ("encoder", "plain", False, False)
    assert spec.roles == ("q", "k", "v", "o", "up", "down")
    assert spec.input_groups == (("q", "k", "v"), ("o",), ("up",), ("down",))
    assert (spec.num_heads, spec.head_dim, spec.num_layers) == (4, 16, 2)
    layers = list(iter_layers(model, spec))
    assert len(layers) == 2
    for layer, _ in layers:
        for role in spec.roles:
            linear = get_linear(model, layer, role, spec)
            assert type(linear) is nn.Linear and tuple(linear.weight.shape) == spec.shape(role)
            assert (linear.bias is not None) == spec.bias[role]
            assert model.get_submodule(linear_name(model, layer, role, spec)) is linear
    assert isinstance(final_norm(model), nn.LayerNorm) and spec.model_type in FINAL_NORMS


def test_dinov2_mlp_width_comes_from_mlp_ratio():
    """DINOv2 ignores ``intermediate_size``: the spec must use ``hidden_size * mlp_ratio``."""
    config = transformers.Dinov2Config(hidden_size=64, num_attention_heads=4, mlp_ratio=3)
    model = transformers.Dinov2Model(config)
    assert mlp_width(config) == model.encoder.layer[0].mlp.fc1.out_features == 192
    assert get_spec(sync_mlp_width(model)).shape("up") == (192, 64)
    assert mlp_width(transformers.ViTConfig(intermediate_size=100)) == 100


def test_qkv_bias_follows_the_config():
    spec = get_spec(tiny_vision_model("vit", qkv_bias=False))
    assert [role for role in spec.roles if spec.bias[role]] == ["o", "up", "down"]


@pytest.mark.parametrize("arch", ["vit", "dinov2"])
def test_input_groups_read_one_tensor(arch):
    """q, k and v see the same tensor; fc1's input is the second layer norm, not o's input."""
    model = tiny_vision_model(arch)
    spec = get_spec(model)
    seen = {}
    hooks = [get_linear(model, 0, role, spec).register_forward_pre_hook(
        lambda mod, args, role=role: seen.__setitem__(role, args[0])) for role in spec.roles]
    with torch.no_grad():
        _features(model, pixel_batch(1))
    for hook in hooks:
        hook.remove()
    assert seen["q"] is seen["k"] is seen["v"] or (torch.equal(seen["q"], seen["k"]) and torch.equal(seen["q"], seen["v"]))
    assert not torch.equal(seen["o"], seen["q"]) and not torch.equal(seen["up"], seen["q"])


def _factorise_everything(model, block_identity_role="down"):
    """Replace every encoder linear by an exact full-rank factorisation (one with a block identity)."""
    spec = get_spec(model)
    for layer, _ in iter_layers(model, spec):
        for role in spec.roles:
            dense = get_linear(model, layer, role, spec)
            u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
            left, right = u * s, vh
            columns = None
            if role == block_identity_role and layer == 0:
                # R = J^-1 V^T with J = V^T[:, cols] puts an identity on the chosen columns.
                columns = list(range(2, 2 + right.shape[0]))
                junction = right[:, columns]
                left, right = left @ junction, torch.linalg.solve(junction, right)
            bias = None if dense.bias is None else dense.bias.detach()
            set_linear(model, layer, role, FactorizedLinear.from_factors(left, right, bias, columns=columns), spec)
    return model


@pytest.mark.parametrize("arch,cls", VISION_CLASSES)
def test_full_rank_factorisation_reproduces_outputs(arch, cls):
    dense = tiny_vision_model(arch, cls)
    pixels = pixel_batch()
    with torch.no_grad():
        reference = _features(dense, pixels)
        factorised = _features(_factorise_everything(tiny_vision_model(arch, cls)), pixels)
    assert torch.allclose(factorised, reference, rtol=0, atol=1e-10 * reference.abs().max())


@pytest.mark.parametrize("arch,cls", [("vit", "ViTForImageClassification"), ("deit", "DeiTModel"),
                                      ("dinov2", "Dinov2Model")])
def test_save_reload_is_bit_exact(arch, cls, tmp_path):
    model = _factorise_everything(tiny_vision_model(arch, cls))
    # Lower the rank of one linear so the manifest records a real compression.
    spec = get_spec(model)
    dense = tiny_vision_model(arch, cls)
    u, s, vh = torch.linalg.svd(get_linear(dense, 1, "up", spec).weight.detach(), full_matrices=False)
    set_linear(model, 1, "up", FactorizedLinear.from_factors(u[:, :8] * s[:8], vh[:8],
                                                              get_linear(dense, 1, "up", spec).bias.detach()), spec)
    folder = save_compressed(model, tmp_path / "saved", {"recipe": "flar", "options": {"ratio": 0.3}})
    loaded = load_compressed(folder)
    pixels = pixel_batch(seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels)[0], model(pixel_values=pixels)[0])
    assert type(loaded) is type(model)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_type"] == arch and manifest["model_class"] == cls
    assert manifest["modules"][linear_name(model, 1, "up", spec)]["rank"] == 8
    assert len(manifest["modules"]) == 2 * len(spec.roles)


def test_compress_refuses_batches_that_are_not_images():
    import lrmath_hf

    model = tiny_vision_model("dinov2", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"batch 0 \(torch.int64, shape \(2, 8\)\) is not pixel values"):
        lrmath_hf.compress(model, [torch.zeros(2, 8, dtype=torch.long)], recipe="svd-llm", ratio=0.2, progress=False)
    with pytest.raises(ValueError, match="is not pixel values"):
        lrmath_hf.compress(model, [torch.zeros(3, 56, 56)], recipe="flar", ratio=0.2, progress=False)


def test_image_processor_batches_are_accepted():
    """What an image processor returns (a BatchFeature, a Mapping but not a dict) calibrates like a tensor."""
    import lrmath_hf

    pixels = pixel_batch(2, dtype=torch.float32)
    reports = []
    for batch in (pixels, transformers.BatchFeature({"pixel_values": pixels})):
        model = tiny_vision_model("dinov2", dtype=torch.float32)
        reports.append(lrmath_hf.compress(model, [batch], recipe="flar", ratio=0.3, progress=False,
                                          criterion="weight", latency_aware=False))
    assert reports[0].ranks == reports[1].ranks
    assert reports[1].calibration["tokens"] == reports[0].calibration["tokens"]
