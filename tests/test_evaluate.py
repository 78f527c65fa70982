import os
import subprocess
import sys

import numpy as np
import pytest

from configs import evaluate as evaluate_config
from diffq import data
from diffq.eval import evaluator as evaluator_lib
from diffq.eval import reference, sample_quality
from diffq.jobs import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_against_itself_scores_perfectly():
  ev = evaluator_lib.load_evaluator()
  raw, labels = data.load_raw("test")
  images = data.to_uint8(data.to_model_space(raw[:600]))
  ref = reference.compute_reference(ev, images)
  out = sample_quality.evaluate(ev, ref, images, labels[:600], kid_subsets=5, kid_subset_size=200)
  assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-4  # sFID: 1024-d, rank-deficient at N=600
  assert out["precision"] == out["recall"] == 1.0
  assert out["class_acc"] > 0.85


def test_evaluate_job_on_real_images_and_cache(tmp_path):
  raw, labels = data.load_raw("train")
  path = tmp_path / "samples.npz"
  np.savez(path, arr_0=data.to_uint8(data.to_model_space(raw[:1000])), arr_1=labels[:1000])
  c = evaluate_config.get_config()
  c.samples, c.eval.cache_dir, c.eval.kid_subsets = str(path), str(tmp_path / "cache"), 10
  out = evaluate.run(c, str(tmp_path / "w"))
  # real train images vs the test split: close in every metric (the train/test noise floor)
  assert out["fid"] < 2.0 and out["precision"] > 0.6 and out["recall"] > 0.6 and out["class_acc"] > 0.9
  assert len(os.listdir(tmp_path / "cache")) == 1
  again = evaluate.run(c, str(tmp_path / "w2"))  # now from the cache
  assert again["fid"] == out["fid"]


def test_pickled_and_malformed_samples_are_refused(tmp_path):
  p = tmp_path / "pickled.npz"
  np.savez(p, arr_0=np.array([object()], dtype=object))
  with pytest.raises(ValueError, match="pickled"):
    sample_quality.load_samples(str(p))
  p = tmp_path / "float.npz"
  np.savez(p, arr_0=np.zeros((2, 32, 32, 1), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    sample_quality.load_samples(str(p))
  p = tmp_path / "nolabels.npz"
  np.savez(p, images=np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="no 'arr_0'"):
    sample_quality.load_samples(str(p))
  p = tmp_path / "corrupt.npz"
  p.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="damaged .npz archive"):
    sample_quality.load_samples(str(p))
  p = tmp_path / "rgb.npz"
  np.savez(p, arr_0=np.zeros((2, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match="needs \\[32, 32, 1\\]"):
    evaluate.score(evaluate_config.get_config().eval, *sample_quality.load_samples(str(p)))


def test_main_evaluate_requires_samples(tmp_path):
  out = subprocess.run([sys.executable, "main.py", "--config=configs/evaluate.py", f"--workdir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "--config.samples=PATH" in out.stderr


def test_labels_outside_the_classes_are_refused():
  images, labels = np.zeros((4, 32, 32, 1), np.uint8), np.array([0, 3, 9, 10])
  with pytest.raises(ValueError, match=r"class ids in \[0, 10\) .* got 0..10"):
    evaluate.score(evaluate_config.get_config().eval, images, labels)


def test_a_damaged_reference_cache_is_recomputed(tmp_path):
  ev = evaluator_lib.load_evaluator()
  sha = evaluator_lib.npz.load_manifest(evaluator_lib.DEFAULT_PATH)["sha256"]
  first = reference.load_or_compute(ev, sha, str(tmp_path))
  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  with open(path, "r+b") as f:
    f.truncate(1000)
  again = reference.load_or_compute(ev, sha, str(tmp_path))  # a warning, then the same statistics
  np.testing.assert_array_equal(again["mu"], first["mu"])
  assert sample_quality.npz.read_npz(str(path)).keys() >= set(reference.KEYS)


def test_a_missing_dataset_names_the_key_of_the_scoring_config(tmp_path):
  c = evaluate_config.get_config().eval
  c.data_dir, c.cache_dir = str(tmp_path / "nowhere"), str(tmp_path / "cache")
  with pytest.raises(FileNotFoundError, match="--config.eval.data_dir"):
    evaluate.check_settings(c)
