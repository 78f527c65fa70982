import json
import os
import pickle

import jax
import numpy as np
import pytest

from diffq.io import npz
from diffq.models import dit


def tree():
  cfg = dit.preset("FM", hidden_size=32, depth=1, num_heads=2)
  params = jax.device_get(dit.init_params(cfg, jax.random.key(0)))
  return {"params": params, "quant": {"codes": np.arange(12, dtype=np.uint8).reshape(3, 4),
                                      "bits": np.array([2, 3], np.int8), "scale": np.float32(0.5)}}


def test_round_trip_is_exact(tmp_path):
  t = tree()
  path = str(tmp_path / "state.npz")
  manifest = npz.export_npz(path, t, metadata={"note": "x"})
  back, m2 = npz.import_npz(path)
  assert m2 == manifest and m2["metadata"] == {"note": "x"}
  assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, t))
  jax.tree.map(lambda a, b: (np.testing.assert_array_equal(a, b), a.dtype == b.dtype or pytest.fail()), t, back)


def test_exported_params_reproduce_model_output(tmp_path):
  cfg = dit.preset("FM", hidden_size=32, depth=1, num_heads=2)
  params = jax.tree.map(lambda p: p + 0.01 * np.arange(p.size).reshape(p.shape) % 0.3,
                        jax.device_get(dit.init_params(cfg, jax.random.key(0))))
  npz.export_npz(str(tmp_path / "p.npz"), params)
  back, _ = npz.import_npz(str(tmp_path / "p.npz"))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  f = lambda p: np.asarray(dit.DiT(config=cfg).apply({"params": p}, x, np.array([1, 2]), np.array([3, 4])))
  np.testing.assert_array_equal(f(params), f(back))


def test_pickled_npz_is_refused(tmp_path):
  path = str(tmp_path / "evil.npz")
  np.savez(path, a=np.array([{"x": 1}], dtype=object))
  json.dump({"format": npz.FORMAT, "sha256": npz._sha256(path), "arrays": {"a": {"shape": [1], "dtype": "object"}},
             "metadata": {}}, open(str(tmp_path / "evil.json"), "w"))
  with pytest.raises(ValueError, match="pickled"):
    npz.import_npz(path)


def test_corrupt_or_mismatched_files_are_refused(tmp_path):
  path = str(tmp_path / "s.npz")
  npz.export_npz(path, {"a": np.zeros(3)})
  with open(path, "r+b") as f:
    f.seek(40)
    f.write(b"garbage")
  with pytest.raises(ValueError, match="sha256"):
    npz.import_npz(path)
  with pytest.raises(FileNotFoundError, match="Manifest"):
    npz.load_manifest(str(tmp_path / "x.npz"))


def test_export_rejects_unexportable_trees(tmp_path):
  with pytest.raises(TypeError, match="object arrays"):
    npz.export_npz(str(tmp_path / "o.npz"), {"a": np.array([pickle], dtype=object)})
  with pytest.raises(ValueError, match="without '/'"):
    npz.export_npz(str(tmp_path / "o.npz"), {"a/b": np.zeros(1)})
  assert not (tmp_path / "o.npz").exists()


def test_an_edited_manifest_is_refused(tiny_export):
  import shutil
  path = tiny_export.replace(".npz", "_edited.npz")
  shutil.copy(tiny_export, path)
  manifest = json.load(open(npz.manifest_path(tiny_export)))
  manifest["metadata"]["model"]["num_heads"] = 1  # same shapes, other model: only the checksum can tell
  json.dump(manifest, open(npz.manifest_path(path), "w"))
  with pytest.raises(ValueError, match="does not match its own checksum: it was edited"):
    npz.import_npz(path)


def test_weights_that_do_not_fit_the_model_config_are_refused(tmp_path):
  from diffq.jobs import sample
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  params = jax.device_get(dit.init_params(cfg, jax.random.key(0)))
  npz.export_npz(str(tmp_path / "p.npz"), params, metadata=dict(kind="dit_params", model=dict(cfg.__dict__, depth=3)))
  with pytest.raises(ValueError, match=r"do not fit the model config, e.g. missing blocks_2"):
    sample.load_dit(str(tmp_path / "p.npz"))


def test_unreadable_files_get_errors_that_say_what_they_are(tmp_path):
  path = str(tmp_path / "s.npz")
  npz.export_npz(path, {"a": np.zeros(3)})
  text = open(npz.manifest_path(path)).read()
  open(npz.manifest_path(path), "w").write(text[:len(text) // 2])
  with pytest.raises(ValueError, match=r"s.json is not valid JSON .* truncated or edited"):
    npz.import_npz(path)
  open(tmp_path / "notes.npz", "w").write("just some text\n")
  with pytest.raises(ValueError, match=r"is not an .npz archive \(it starts with b'just'"):
    npz.read_npz(str(tmp_path / "notes.npz"))
  with open(path, "r+b") as f:
    f.truncate(60)
  with pytest.raises(ValueError, match="damaged .npz archive"):
    npz.read_npz(path)


def test_non_finite_arrays_are_never_exported(tmp_path):
  with pytest.raises(FloatingPointError, match=r"NaN/inf, e.g. \['b/c'\]"):
    npz.export_npz(str(tmp_path / "n.npz"), {"a": np.zeros(2), "b": {"c": np.array([1.0, np.nan])}})
  assert not os.listdir(tmp_path)
