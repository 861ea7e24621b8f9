"""Sharded calibration over 2 gloo processes equals 1 process; every rank holds the same statistics.

One spawn of 2 CPU processes (``torch.multiprocessing``, gloo, a file store) runs these
scenarios on a tiny float64 llama: parallel calibration, sequential calibration with an
``on_layer`` that compresses each layer from the merged statistics, ``lrmath_hf.compress``
(which shards through its calibration with no option), and three misuses (a
rank without batches, ranks with different plans, a wrong ``world_size``). Each rank writes its statistics as ``.npz`` (no pickle); the parent compares them
with a 1-process calibration on all batches.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import numpy as np
import pytest
import torch

import lrmath
import lrmath_hf
from lrmath_hf.calibrate import CalibrationPlan, calibrate
from lrmath_hf.distributed import shard_batches
from lrmath_hf.specs import get_spec, iter_layers

from ._tiny_models import tiny_model, token_batch

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
N_BATCHES = 6
REL = 1e-12


def calibration():
    return [token_batch(seed=10 + i, batch=2, length=12) for i in range(N_BATCHES)]


def make_plan(spec) -> CalibrationPlan:
    # float64 Gram products: float32 ones would round differently for every split of the rows
    inputs = {"+".join(group): spec.linears[group[0]] for group in spec.input_groups}
    heads = {"v": (spec.linears["v"], spec.num_kv_heads, spec.head_dim),
             "q": (spec.linears["q"], spec.num_heads, spec.head_dim)}
    return CalibrationPlan(inputs=inputs, head_outputs=heads, importance=True, gram_dtype=torch.float64)


def compress_from_stats(model, spec):
    """An ``on_layer`` that projects each layer's down-projection input onto its top half
    principal subspace of the merged second moment, so later layers see a changed model."""
    layers = [layer for _, layer in iter_layers(model, spec)]

    def on_layer(index, stats):
        moment = stats.inputs["down"].second_moment()
        _, vectors = torch.linalg.eigh(moment)
        top = vectors[:, moment.shape[0] // 2:]
        down = layers[index].get_submodule(spec.linears["down"])
        down.weight.copy_(down.weight @ top @ top.T)

    return on_layer


def run(model, spec, batches, *, sequential=False, **kwargs):
    layers = [layer for _, layer in iter_layers(model, spec)]
    on_layer = compress_from_stats(model, spec) if sequential else None
    return calibrate(model, layers, batches, make_plan(spec), sequential=sequential, on_layer=on_layer,
                     progress=False, **kwargs)


def flatten(result) -> dict[str, np.ndarray]:
    """Every statistic of a :class:`CalibrationResult` as named float64 / int64 arrays."""
    out = {"tokens": np.asarray(result.tokens), "world_size": np.asarray(result.world_size)}
    for index, layer in enumerate(result.layers):
        for field in ("inputs", "head_outputs"):
            for name, acc in getattr(layer, field).items():
                for key, value in acc.to_dict().items():
                    out[f"{index}/{field}/{name}/{key}"] = np.asarray(value)
        for key, value in layer.importance.to_dict().items():
            out[f"{index}/importance/{key}"] = np.asarray(value)
    return out


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        batches = shard_batches(calibration())
        for mode in ("parallel", "sequential"):
            model = tiny_model("llama")
            result = run(model, get_spec(model), batches, sequential=mode == "sequential")
            np.savez(os.path.join(out_dir, f"{mode}-{rank}.npz"), **flatten(result))
        np.savez(os.path.join(out_dir, f"compress-{rank}.npz"), **compressed(batches))
        model = tiny_model("llama")
        spec = get_spec(model)
        layers = [layer for _, layer in iter_layers(model, spec)]
        plan = make_plan(spec)
        other_plan = plan if rank == 0 else dataclasses.replace(plan, importance=False)
        misuses = {
            # every rank raises the same clear error instead of waiting for the others forever
            "empty": lambda: run(model, spec, batches if rank == 0 else []),
            "plans": lambda: calibrate(model, layers, batches, other_plan, progress=False),
            "world": lambda: shard_batches(calibration(), rank, 3),
        }
        for name, misuse in misuses.items():
            try:
                misuse()
            except ValueError as error:
                with open(os.path.join(out_dir, f"{name}-{rank}.txt"), "w") as f:
                    f.write(str(error))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Output folder of one 2-process run of :func:`_worker`."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


def compressed(batches) -> dict[str, np.ndarray]:
    """Logits and report of ``lrmath_hf.compress`` with recipe flat on ``batches``."""
    model = tiny_model("llama")
    report = lrmath_hf.compress(model, batches, recipe="flat", ratio=0.3, progress=False)
    with torch.no_grad():
        logits = model(token_batch(seed=99, batch=2, length=12)).logits
    return {"logits": logits.numpy(), "tokens": np.asarray(report.calibration["tokens"]),
            "ratio": np.asarray(report.ratio_achieved)}


def load(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def assert_close(got: dict, want: dict, rel: float) -> None:
    """Every array of ``want`` in ``got``, within ``rel`` of the array's largest entry."""
    assert set(got) - {"world_size"} == set(want) - {"world_size"}
    for key, expected in want.items():
        if key == "world_size":
            continue
        actual = got[key]
        if expected.dtype.kind in "iUS" or key.endswith(("count", "tokens", "format_version", "dim", "mode")):
            np.testing.assert_array_equal(actual, expected, err_msg=key)
            continue
        scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float64).tiny)
        err = float(np.abs(actual - expected).max(initial=0.0)) / scale
        assert err <= rel, f"{key}: relative error {err:.2e} > {rel:.0e}"


def reference(sequential: bool) -> dict:
    model = tiny_model("llama")
    return flatten(run(model, get_spec(model), calibration(), sequential=sequential))


def test_two_gloo_processes_equal_one_process(sharded):
    """Counts, means, covariances, third and fourth power sums and importance sums to 1e-12."""
    got = load(sharded / "parallel-0.npz")
    assert int(got["world_size"]) == WORLD
    want = reference(sequential=False)
    assert int(want["world_size"]) == 1
    assert_close(got, want, REL)
    # each rank saw half the tokens, yet the merged counts are the full calibration's
    assert int(got["0/inputs/q+k+v/count"]) == N_BATCHES * 2 * 12 == int(got["tokens"])


def test_every_rank_holds_identical_statistics(sharded):
    for mode in ("parallel", "sequential"):
        first, second = load(sharded / f"{mode}-0.npz"), load(sharded / f"{mode}-1.npz")
        assert set(first) == set(second)
        for key in first:
            np.testing.assert_array_equal(first[key], second[key], err_msg=f"{mode}: {key}")


def test_sequential_sharded_calibration_follows_on_layer(sharded):
    """Each rank propagates its shard through the layer on_layer compressed from merged statistics."""
    got = load(sharded / "sequential-0.npz")
    want = reference(sequential=True)
    # eigenvectors amplify the merge's rounding by 1 / eigengap; here that stays ~1e-15
    assert_close(got, want, REL)
    # the compression changed what layer 1 saw, so this is not the parallel result
    dense = reference(sequential=False)
    key = "1/inputs/q+k+v/m2"
    assert np.abs(got[key] - dense[key]).max() > 1e-3 * np.abs(dense[key]).max()


def test_compress_under_torch_distributed_equals_one_process(sharded):
    """compress() on each rank's shard compresses every rank's model like one process on all batches."""
    first, second = load(sharded / "compress-0.npz"), load(sharded / "compress-1.npz")
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    want = compressed(calibration())
    assert int(first["tokens"]) == int(want["tokens"])
    assert float(first["ratio"]) == float(want["ratio"])
    # the recipe's plans form each partial Gram product in float32 (gram_dtype), and sharding
    # regroups the rows: float32 rounding, not the 1e-12 of float64 plans
    scale = np.abs(want["logits"]).max()
    assert np.abs(first["logits"] - want["logits"]).max() <= 1e-4 * scale


@pytest.mark.parametrize("misuse, message", [
    ("empty", "ranks [1] of 2 have no calibration batches"),
    ("plans", "ranks disagree on the layout of the statistics ['importance']"),
])
def test_mismatched_ranks_raise_on_every_rank(sharded, misuse, message):
    for rank in range(WORLD):
        assert message in (sharded / f"{misuse}-{rank}.txt").read_text()


def test_shard_batches_checks_world_size_against_torch_distributed(sharded):
    assert "world_size=3 but torch.distributed says 2" in (sharded / "world-0.txt").read_text()


def test_shard_batches_is_balanced_and_checks_its_arguments():
    batches = list(range(7))
    shards = [shard_batches(batches, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == batches
    with pytest.raises(ValueError, match="every rank needs at least one"):
        shard_batches(range(2), 0, 3)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_batches(batches, 3, 3)
    with pytest.raises(ValueError, match="pass rank and world_size"):
        shard_batches(batches)


def test_not_distributed_is_unchanged():
    """Without torch.distributed (or with process_group=False) nothing is merged."""
    assert not dist.is_initialized()
    model = tiny_model("llama")
    spec = get_spec(model)
    result = run(model, spec, calibration()[:2], process_group=False)
    assert result.world_size == 1
    with pytest.raises(RuntimeError, match="not initialised"):
        run(model, spec, calibration()[:2], process_group=object())  # a group needs init_process_group


def test_importance_state_round_trip_and_merge():
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4))) for _ in range(3)]
    pairs[0][0][0, 0] = 0.0  # a token without an angle
    whole = lrmath.AngularImportance()
    for x_in, x_out in pairs:
        whole.update(x_in, x_out)
    first = lrmath.AngularImportance().update(*pairs[0])
    rest = lrmath.AngularImportance().update(*pairs[1]).update(*pairs[2])
    rebuilt = lrmath.AngularImportance.from_dict(first.to_dict(), like=torch.zeros(1))
    rebuilt.merge(lrmath.AngularImportance.from_dict(rest.to_dict(), like=torch.zeros(1)))
    for mode in ("paper", "reference"):
        assert float(rebuilt.value(mode)) == pytest.approx(float(whole.value(mode)), rel=1e-14, abs=1e-15)
    assert isinstance(rebuilt.importance, torch.Tensor) and rebuilt.skipped == whole.skipped == 1
    assert lrmath.AngularImportance.from_dict(lrmath.AngularImportance().to_dict()).tokens == 0
    bad = dict(whole.to_dict(), defined=np.asarray(99.0))
    with pytest.raises(ValueError, match="defined"):
        lrmath.AngularImportance.from_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        lrmath.AngularImportance.from_dict({"tokens": 3})


def test_transport_device_follows_the_backend(monkeypatch):
    """gloo (alone or beside NCCL) moves statistics through the CPU; NCCL alone needs an accelerator."""
    from lrmath_hf import distributed

    for config, want in (("cpu:gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")):
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None, config=config: config)
        assert distributed._transport_device(None) == torch.device(want)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type != "cuda":
        with pytest.raises(RuntimeError, match="no such device"):
            distributed._transport_device(None)
    else:
        assert distributed._transport_device(None) == torch.device("cuda", torch.cuda.current_device())
