"""diffq's additive VQ (diffq/quant/vq.py) against the official AQLM implementation, on one synthetic layer.

  python experiments/aqlm_reference.py [--settings 2x8g8b1,2x8g8b4,1x8g4b1,3x8g8b1] [--side both|aqlm|diffq]
      [--max_epochs 10] [--steps_per_epoch 100] [--tolerance 0.01] [--lr 1e-4] [--aqlm_dir /work/aqlm_ref]
      [--out experiments/results/aqlm_reference.md]

One DiT-like linear layer built with numpy (identical arrays for both sides): inputs X (4096, 1024) = Z diag(s) Qᵀ
(Z standard normal, Q random orthogonal, s_i = (1 + i)^-0.5: a decaying spectrum) with 8 outlier channels x20;
kernel (in 1024, out 256) normal / sqrt(in) times a per-output-channel factor exp(0.25 N(0, 1)); H = XᵀX / 4096
computed in float64 and handed to both sides as float32. Setting MxBgGbK = M codebooks of 2^B codewords over groups
of G inputs, beam K. Per setting, in one process one after the other: AQLM's AQEngine.quantize (k-means init with
its own code, 100 Lloyd iterations; torch on 2 threads), then diffq's vq.quantize_weight twice, cold (including jit
compilation) and warm. rel_err = tr(dW H dWᵀ) / tr(W H Wᵀ) in float64 numpy on the dequantized weight.

The AQLM source is imported, never copied, from --aqlm_dir (an extracted tree of github Vahe1994/AQLM) and needs
torch in this venv. Writes --out (markdown).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {"2x8g8b1": (2, 8, 8, 1), "2x8g8b4": (2, 8, 8, 4), "1x8g4b1": (1, 8, 4, 1), "3x8g8b1": (3, 8, 8, 1)}
N_IN, N_OUT, N_TOKENS, N_OUTLIERS = 1024, 256, 4096, 8
NVIDIA_LIBS = ("nvidia-cudnn-cu13==9.24.0.43 nvidia-cusparselt-cu13==0.8.1 nvidia-nccl-cu13==2.30.7 "
               "nvidia-nvshmem-cu13==3.4.5 nvidia-cublas==13.1.1.3 nvidia-cuda-nvrtc==13.0.88 "
               "nvidia-cuda-runtime==13.0.96 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 "
               "nvidia-curand==10.4.0.35 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.5.37")
SETUP_HINT = ("The AQLM side needs the AQLM source and torch (not in requirements.txt):\n"
              "  fetch github Vahe1994/AQLM; mkdir -p {dir}; git --git-dir=<bare dir> archive HEAD | tar -x -C {dir}; "
              "git --git-dir=<bare dir> rev-parse HEAD > {dir}/COMMIT\n"
              "  .venv/bin/pip install --no-deps torch==2.14.1 filelock sympy mpmath==1.3.0 networkx jinja2\n"
              "  .venv/bin/pip install --no-deps " + NVIDIA_LIBS + "   # the torch wheel links them even on CPU")


def make_layer(seed: int = 0):
  """(kernel (in, out) float32, H float32, H float64) of the synthetic layer."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(N_IN, N_IN)))
  x = rng.normal(size=(N_TOKENS, N_IN)) * (1.0 + np.arange(N_IN)) ** -0.5 @ q.T
  x[:, rng.choice(N_IN, N_OUTLIERS, replace=False)] *= 20.0
  kernel = rng.normal(size=(N_IN, N_OUT)) / np.sqrt(N_IN) * np.exp(0.25 * rng.normal(size=N_OUT))
  h64 = x.T @ x / N_TOKENS
  return kernel.astype(np.float32), h64.astype(np.float32), h64


def rel_err(kernel, kernel_hat, h64) -> float:
  d = np.asarray(kernel_hat, np.float64) - kernel
  return float(np.sum(d * (h64 @ d)) / np.sum(kernel * (h64 @ kernel)))


def run_aqlm(aq_engine, torch, kernel, h32, setting, a, seed: int) -> dict:
  m, bits, g, beam = setting
  torch.manual_seed(seed), random.seed(seed)
  layer = torch.nn.Linear(N_IN, N_OUT, bias=False)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
  engine = aq_engine.AQEngine(layer)
  engine.XTX = torch.from_numpy(h32).to(torch.float64)  # AQLM accumulates XTX (mean x xᵀ) in float64
  h = np.asarray(h32, np.float64)
  ref_norm = np.sum(kernel * (h @ kernel)) / N_OUT  # AQLM's loss is tr(dW XTX dWᵀ) / out_features
  seen = dict(losses=[], searches=0)
  mse, search = engine._compute_mse, engine.beam_search_update_codes_

  def counting_mse(*args, **kw):  # record the loss at each epoch start (AQLM's own early-stop quantity)
    loss = mse(*args, **kw)
    if len(seen["losses"]) == seen["searches"]:
      seen["losses"].append(loss.item() / ref_norm)
    return loss

  def counting_search(*args, **kw):
    seen["searches"] += 1
    return search(*args, **kw)

  engine._compute_mse, engine.beam_search_update_codes_ = counting_mse, counting_search
  args = Namespace(devices=[torch.device("cpu")], num_codebooks=m, nbits_per_codebook=bits, in_group_size=g,
                   out_group_size=1, beam_size=beam, codebook_value_nbits=16, codebook_value_num_groups=1,
                   scale_nbits=0, init_max_iter=100, init_max_points_per_centroid=None, lr=a.lr,
                   max_epochs=a.max_epochs, steps_per_epoch=a.steps_per_epoch, relative_mse_tolerance=a.tolerance,
                   print_frequency=10)
  t0 = time.perf_counter()
  qw = engine.quantize(args=args, verbose=False)
  seconds = time.perf_counter() - t0
  with torch.no_grad():
    w_hat = qw().double().numpy().T
  return dict(rel_err=rel_err(kernel, w_hat, a.h64), seconds=seconds, epochs=seen["searches"],
              init=seen["losses"][0], losses=seen["losses"])


def run_diffq(vq, jax, kernel, h32, setting, a, seed: int) -> list[dict]:
  """Seed 0: a cold (compiling) and a warm run; other seeds: one run (the spread of the fit's randomness)."""
  m, bits, g, beam = setting
  rows = []
  for tag in (("cold", "warm") if seed == 0 else (f"seed {seed}",)):
    t0 = time.perf_counter()
    w, info = vq.quantize_weight(kernel, h32, num_codebooks=m, codebook_bits=bits, group_size=g, beam_size=beam,
                                 steps_per_epoch=a.steps_per_epoch, lr=a.lr, max_epochs=a.max_epochs,
                                 tolerance=a.tolerance, seed=seed)
    w_hat = np.asarray(jax.block_until_ready(vq.dequantize(w)))
    seconds = time.perf_counter() - t0
    losses = info.get("losses") or [float("nan")]
    rows.append(dict(side=f"diffq {tag}", rel_err=rel_err(kernel, w_hat, a.h64), seconds=seconds,
                     epochs=info.get("epochs", ""), init=losses[0], losses=losses))
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--settings", default=",".join(SETTINGS))
  ap.add_argument("--side", default="both", choices=("both", "aqlm", "diffq"))
  ap.add_argument("--max_epochs", type=int, default=10)
  ap.add_argument("--steps_per_epoch", type=int, default=100)
  ap.add_argument("--tolerance", type=float, default=0.01)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--seeds", default="0", help="comma-separated fit seeds (k-means starts, beam-search orders)")
  ap.add_argument("--aqlm_dir", default="/work/aqlm_ref")
  ap.add_argument("--out", default="experiments/results/aqlm_reference.md")
  a = ap.parse_args()
  settings = {name: SETTINGS[name] for name in a.settings.split(",")}
  kernel, h32, a.h64 = make_layer()
  header = [f"Produced by: `{' '.join(['python', 'experiments/aqlm_reference.py', *sys.argv[1:]])}`", ""]

  if a.side in ("both", "aqlm"):
    os.environ.setdefault("TQDM_DISABLE", "1")  # AQLM's k-means and beam search draw progress bars
    try:
      import torch
      sys.path.insert(1, a.aqlm_dir)
      import aq_engine
    except ImportError as e:
      sys.exit(f"{e}\n" + SETUP_HINT.format(dir=a.aqlm_dir))
    torch.set_num_threads(2)
    commit_file = os.path.join(a.aqlm_dir, "COMMIT")
    commit = open(commit_file).read().strip() if os.path.exists(commit_file) else "unknown commit"
    header.append(f"AQLM: Vahe1994/AQLM at {commit} (from {a.aqlm_dir}); torch {torch.__version__} on CPU, "
                  f"{torch.get_num_threads()} threads.")
  if a.side in ("both", "diffq"):
    import jax
    from diffq.quant import vq
    git = lambda *cmd: subprocess.run(["git", "-C", ROOT, *cmd], capture_output=True, text=True).stdout.strip()
    dirty = " + uncommitted vq.py changes" if git("status", "--porcelain", "diffq/quant/vq.py") else ""
    header.append(f"diffq: commit {git('rev-parse', '--short', 'HEAD')}{dirty}; jax "
                  f"{importlib.metadata.version('jax')} on {jax.devices()[0].platform}.")

  results = []
  for name, setting in settings.items():
    for seed in map(int, a.seeds.split(",")):
      if a.side in ("both", "aqlm"):
        results.append(dict(setting=name, side="AQLM" if seed == 0 else f"AQLM seed {seed}",
                            **run_aqlm(aq_engine, torch, kernel, h32, setting, a, seed)))
        print(results[-1], flush=True)
      if a.side in ("both", "diffq"):
        for r in run_diffq(vq, jax, kernel, h32, setting, a, seed):
          results.append(dict(setting=name, **r))
          print(results[-1], flush=True)

  ref = {r["setting"]: r for r in results if r["side"] == "AQLM"}
  lines = ["# diffq VQ vs the official AQLM on one synthetic layer", "", *header, "",
           f"Layer: kernel (in {N_IN}, out {N_OUT}) normal / sqrt(in) x exp(0.25 N(0,1)) per output channel; "
           f"X ({N_TOKENS}, {N_IN}) = Z diag((1 + i)^-0.5) Qᵀ with {N_OUTLIERS} outlier channels x20; "
           f"H = XᵀX / {N_TOKENS} (float64, passed as float32); seed 0. Fit: max_epochs {a.max_epochs}, "
           f"steps_per_epoch {a.steps_per_epoch}, tolerance {a.tolerance}, lr {a.lr}; AQLM k-means 100 iterations, "
           "out_group_size 1, scale_nbits 0 (one trained scale per output channel), fp32 codebooks.", "",
           "Setting MxBgGbK: M codebooks of 2^B codewords, groups of G inputs, beam K. rel_err = tr(dW H dWᵀ) / "
           "tr(W H Wᵀ); init = the same after k-means; epochs = Adam + beam-search rounds run; "
           "ratios are diffq / AQLM.", "",
           "| setting | side | rel_err | init rel_err | seconds | epochs | err ratio | time ratio |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    base = ref.get(r["setting"])
    ratios = (f"{r['rel_err'] / base['rel_err']:.3f} | {r['seconds'] / base['seconds']:.2f}"
              if base and r is not base else " | ")
    lines.append(f"| {r['setting']} | {r['side']} | {r['rel_err']:.5f} | {r['init']:.5f} | {r['seconds']:.1f} | "
                 f"{r['epochs']} | {ratios} |")
  text = "\n".join(lines) + "\n"
  print(text)
  out = a.out if os.path.isabs(a.out) else os.path.join(ROOT, a.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
