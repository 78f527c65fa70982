"""The evaluator classifier: model, training job, export round trip and the committed frozen asset."""
import json

import jax
import numpy as np
import pytest

from configs import train_evaluator
from diffq import data, parallel
from diffq.eval import evaluator
from diffq.io import npz
from diffq.jobs import train_classifier
from diffq.models import classifier


def tiny_config(**overrides):
  c = train_evaluator.get_config("tiny")
  c.update(overrides)
  return c


def random_u8(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)


def tiny_variables():
  """Tiny-classifier variables with non-trivial batch_stats, so eval mode visibly uses them."""
  model = train_classifier.make_model(tiny_config())
  variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32)))
  rng = np.random.default_rng(1)
  stats = jax.tree.map(lambda s: s + rng.uniform(0.1, 0.5, s.shape).astype(np.float32), variables["batch_stats"])
  return model, dict(params=variables["params"], batch_stats=stats)


def test_classifier_output_shapes():
  model = classifier.Classifier()
  x = jax.ShapeDtypeStruct((3, 32, 32, 1), np.float32)
  out = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
  assert out["logits"].shape == (3, 10) and out["pool"].shape == (3, 128)
  assert out["spatial"].shape == (3, 8, 8, 16)


def test_from_uint8_is_the_exact_inverse_of_to_uint8():
  u8 = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(data.to_uint8(data.from_uint8(u8)), u8)


def test_augment_flips_and_shifts_with_background_fill():
  x = np.random.default_rng(0).uniform(-1, 1, (64, 32, 32, 1)).astype(np.float32)
  rng = jax.random.key(0)
  flipped = np.asarray(train_classifier.augment(x, rng, flip=True, max_shift=0))
  is_flip = np.all(flipped == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(is_flip | np.all(flipped == x, axis=(1, 2, 3))) and 0 < is_flip.sum() < 64
  shifted = np.asarray(train_classifier.augment(x, rng, flip=False, max_shift=2))
  assert shifted.shape == x.shape and np.any(shifted == -1.0)
  assert all(any(np.array_equal(s[2 + dy:30 + dy, 2 + dx:30 + dx], o[2:30, 2:30])
                 for dy in range(-2, 3) for dx in range(-2, 3)) for s, o in zip(shifted[:8], x[:8]))


def test_sharded_train_step_equals_single_device():
  c = tiny_config()
  model = train_classifier.make_model(c)
  rng = np.random.default_rng(0)
  batches = [(rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32), rng.integers(0, 10, 16).astype(np.int32))
             for _ in range(2)]
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    state = jax.device_put(train_classifier.init_state(c, model, 6), parallel.replicated(mesh))
    step = train_classifier.compile_train_step(c, model, 6, mesh, state)
    for x, y in batches:
      state, _ = step(state, *parallel.shard_batch((x, y), mesh))
    results.append(jax.device_get(dict(params=state["params"], batch_stats=state["batch_stats"])))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *results)


def test_tiny_train_job_writes_metrics_and_export(tmp_path):
  out = train_classifier.run(tiny_config(), str(tmp_path))
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  assert {"test_accuracy", "seconds", "params", "steps"} <= set(metrics) and metrics["steps"] == 6
  assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics == pytest.approx(out)
  manifest = npz.load_manifest(str(tmp_path / "classifier.npz"))
  assert manifest["metadata"]["kind"] == "classifier"
  assert any(k.startswith("batch_stats/") for k in manifest["arrays"])
  feats = evaluator.load_evaluator(str(tmp_path / "classifier.npz")).features(random_u8(5))
  assert feats["logits"].shape == (5, 10) and feats["spatial"].shape == (5, 8, 8, 4)


def test_export_then_load_gives_identical_features(tmp_path):
  model, variables = tiny_variables()
  path = str(tmp_path / "c.npz")
  npz.export_npz(path, variables, metadata=dict(kind="classifier", model=tiny_config().model.to_dict()))
  images = random_u8(20)  # 3 batches of 8, the last one padded
  before = evaluator.Evaluator(model, variables, batch_size=8).features(images)
  after = evaluator.load_evaluator(path, batch_size=8).features(images)
  for k in ("logits", "pool", "spatial"):
    np.testing.assert_array_equal(before[k], after[k])
  direct = model.apply(variables, data.from_uint8(images), train=False)
  np.testing.assert_allclose(before["logits"], direct["logits"], rtol=1e-5, atol=1e-5)


def test_wrong_kind_or_input_is_refused(tmp_path):
  model, variables = tiny_variables()
  path = str(tmp_path / "d.npz")
  npz.export_npz(path, variables, metadata=dict(kind="dit_params", model=tiny_config().model.to_dict()))
  with pytest.raises(ValueError, match="not a classifier export"):
    evaluator.load_evaluator(path)
  with pytest.raises(ValueError, match="uint8 images of shape"):
    evaluator.Evaluator(model, variables).features(data.from_uint8(random_u8(2)))


def test_committed_evaluator_classifies_real_test_images(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the default path is relative to the package, not the cwd
  ev = evaluator.load_evaluator()
  x, y = data.load("test")
  feats = ev.features(data.to_uint8(x[:2000]))
  assert feats["pool"].shape == (2000, 128) and feats["spatial"].shape == (2000, 8, 8, 16)
  assert ev.class_accuracy(data.to_uint8(x[:2000]), y[:2000]) >= 0.91
