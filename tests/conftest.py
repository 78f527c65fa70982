"""Simulate 8 CPU devices for every test (must happen before jax initialises its backend); shared fixtures."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (imported after XLA_FLAGS is set)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffq.io import npz  # noqa: E402
from diffq.models import dit  # noqa: E402


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
  """A tiny DiT export with non-zero (perturbed adaLN-Zero) weights, so samples depend on labels."""
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  params = jax.device_get(dit.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)
  path = str(tmp_path_factory.mktemp("export") / "tiny.npz")
  npz.export_npz(path, params, metadata=dict(kind="dit_params", model=cfg.__dict__))
  return path
