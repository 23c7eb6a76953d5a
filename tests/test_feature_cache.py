"""A frozen CNN (optim.backbone_lr=0): its batch norms stay still, and its features are cached per
image (train.feature_cache_mb) without changing what training computes."""

import json

import pytest
import torch

from soho_core.config import load_config
from soho_core.models.backbone import Backbone
from soho_core.models.soho import SohoModel


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)


def _frozen_model() -> SohoModel:
    torch.manual_seed(0)
    model = SohoModel(load_config("tiny").model, vocab_size=100)
    model.backbone.freeze()
    return model.eval()  # the dictionary keeps still too, so two passes can be compared


def test_a_frozen_cnn_keeps_its_batch_norm_statistics_in_training_mode():
    cnn = Backbone(load_config("tiny").model.backbone)
    cnn.freeze().train()
    assert not any(p.requires_grad for p in cnn.parameters())
    bns = [m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    images = _images(4, 0).float() / 255
    with torch.no_grad():
        alone = cnn(images[:1])
        together = cnn(images)
    # An image's features no longer depend on the batch it comes in, and nothing is updated.
    torch.testing.assert_close(alone[0], together[0], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in before.items())


def test_cached_features_are_the_cnn_s_and_seen_images_are_not_run_again():
    model = _frozen_model()
    a, b = _images(4, 1), _images(4, 2)
    sizes = torch.tensor([[64, 64]] * 4)
    with torch.no_grad():
        plain = [model.encode_images(x, sizes).tokens for x in (a, torch.cat([a[:2], b[:2]]))]
        cache = model.cache_features(2 ** 30)
        cached = [model.encode_images(x, sizes).tokens for x in (a, torch.cat([a[:2], b[:2]]))]
    for want, got in zip(plain, cached):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (cache.misses, cache.hits, len(cache)) == (6, 2, 6)
    # The same pixels with another valid size are another image (its padding is normalised apart).
    with torch.no_grad():
        model.encode_images(a[:1], torch.tensor([[48, 64]]))
    assert cache.misses == 7


def test_the_cache_keeps_no_more_than_its_budget():
    model = _frozen_model()
    one = model.backbone(_images(1, 0).float()).numel() * 4
    cache = model.cache_features(2 * one)
    sizes = torch.tensor([[64, 64]] * 4)
    with torch.no_grad():
        first = model.encode_images(_images(4, 3), sizes)  # all computed; the first two are kept
        again = model.encode_images(_images(4, 3), sizes)  # two from the cache, two computed again
    assert len(cache) == 2 and cache.used == 2 * one and cache.hits == 2 and cache.misses == 6
    torch.testing.assert_close(again.tokens, first.tokens, rtol=1e-4, atol=1e-5)


def test_only_a_frozen_cnn_is_cached():
    torch.manual_seed(0)
    model = SohoModel(load_config("tiny").model, vocab_size=100)
    with pytest.raises(ValueError, match="frozen CNN"):
        model.cache_features(2 ** 20)


def test_training_with_the_cache_computes_what_training_without_it_does(task_shards, tiny_pretrained, tmp_path):
    from soho_core.tasks.catalog import get_task
    from soho_core.train.engine import train

    logs = {}
    for mb in (0, 64):
        out = tmp_path / f"cache{mb}"
        train(get_task("vqa"), load_config("tiny", ["finetune.max_steps=8", "train.log_every=2", "optim.backbone_lr=0",
                                                    f"train.feature_cache_mb={mb}"]),
              str(task_shards), str(out), init=str(tiny_pretrained))
        logs[mb] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[mb] = [r for r in logs[mb] if "loss" in r]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[64]] and len(logs[0]) == 4
    for off, on in zip(logs[0], logs[64]):
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-4, abs=1e-5)
        assert "cnn_cached" not in off
    # 40 images a task's split at most: from the third step on, images come again.
    assert 0 < logs[64][-1]["cnn_cached"] < 1


def test_a_saved_cache_serves_another_process_with_the_same_cnn_only(tmp_path):
    from soho_core.models.backbone import FeatureCache, cnn_digest

    model = _frozen_model()
    sizes = torch.tensor([[64, 64]] * 4)
    cache = model.cache_features(2 ** 30)
    with torch.no_grad():
        want = model.encode_images(_images(4, 5), sizes).tokens
    uri = str(tmp_path / "store" / f"{cnn_digest(model.backbone, 'cpu')}.pt")
    assert cache.save(uri) and not cache.save(uri)  # nothing new the second time

    again = _frozen_model()  # the same seed: the same CNN, so the same digest
    assert cnn_digest(again.backbone, "cpu") == cnn_digest(model.backbone, "cpu")
    assert cnn_digest(again.backbone, "cuda") != cnn_digest(model.backbone, "cpu")
    fresh = again.cache_features(2 ** 30)
    assert fresh.load(uri) == 4
    with torch.no_grad():
        got = again.encode_images(_images(4, 5), sizes).tokens
    assert (fresh.hits, fresh.misses) == (4, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    with torch.no_grad():  # another CNN: another digest
        again.backbone.stem[0].weight.add_(0.1)
    assert cnn_digest(again.backbone, "cpu") != cnn_digest(model.backbone, "cpu")
    assert FeatureCache(0).load(uri) == 0  # within its budget: no room, nothing kept
    assert FeatureCache(2 ** 30).load(str(tmp_path / "none.pt")) == 0
    (tmp_path / "bad.pt").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="bad.pt"):
        FeatureCache(2 ** 30).load(str(tmp_path / "bad.pt"))


def test_a_run_and_its_evaluation_reuse_the_features_a_run_before_them_kept(task_shards, tiny_pretrained, tmp_path):
    from soho_core.tasks.catalog import get_task
    from soho_core.train.engine import evaluate, train

    store = tmp_path / "features"
    sets = ["finetune.max_steps=6", "train.log_every=6", "optim.backbone_lr=0", f"train.feature_cache_dir={store}"]
    runs = {}
    for name, extra in (("plain", ["train.feature_cache_dir="]), ("first", []), ("second", [])):
        out = tmp_path / name
        train(get_task("vqa"), load_config("tiny", sets + extra), str(task_shards), str(out), init=str(tiny_pretrained))
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(list(store.iterdir())) == 1  # one CNN, one file
    # The second run found every image of its stream in the first one's file; both computed the same.
    assert runs["first"]["cnn_cached"] < 1 and runs["second"]["cnn_cached"] == 1
    assert runs["second"]["loss"] == runs["first"]["loss"] == pytest.approx(runs["plain"]["loss"], rel=1e-5)

    def kept() -> int:
        return len(torch.load(next(store.iterdir()), weights_only=True)["features"])

    trained = kept()
    reports = [evaluate(get_task("vqa"), str(tmp_path / name), str(task_shards), None) for name in ("plain", "first")]
    assert reports[1]["metrics"] == reports[0]["metrics"]
    # The evaluation added its test images to the same file (the CNN is the one the runs kept still).
    assert len(list(store.iterdir())) == 1 and kept() > trained
