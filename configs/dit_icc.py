"""ICC: increment-calibrated caching of the DiT's block linears (Chen et al., CVPR 2025), sampled and scored.

  python main.py --config=configs/dit_icc.py --workdir=runs/icc                  # period 2, rank 16, CA-SVD
  python main.py --config=configs/dit_icc.py:period=3,rank=32,svd=plain --workdir=runs/icc_p3_r32
  python main.py --config=configs/dit_icc.py:rank=0 --workdir=runs/reuse_p2      # naive caching (FORA-style)
  python main.py --config=configs/dit_icc.py:rank=8,mlp=chain --config.icc.ranks.qkv=0 --config.icc.ranks.proj=0 \
      --config.sample.cache_pattern=FCCCFCCCFCCFCCFCFFFF --workdir=runs/icc_chain  # the fastest cached step
  python main.py --config=configs/dit_icc.py:quick --workdir=/tmp/icc_quick       # smoke run
  python main.py --config=configs/dit_icc.py --config.params=runs/w2a4/quantized.npz --workdir=...  # on W2A4
  python main.py --config=configs/dit_icc.py:xl2 --workdir=runs/xl2_icc          # DiT-XL/2, the released sampler

Step i of the plan is full when i % period == 0 (every layer runs and refreshes its cache) and cached otherwise:
qkv (q, k, v factorised apart), proj, fc1 and fc2 of every block return y_c + (x B - x_c B) A, everything else
(embedders, adaLN, attention, GELU, final layer) is recomputed. `icc.ranks.<type>` sets one layer type's rank;
`sample.cache_pattern` takes any static F/C pattern instead of the period. `icc.mlp='chain'` runs each MLP on cached
steps as one increment through its GELU, linearised at the refresh point (no 4C-wide work; diffq/seam/caches.py).
"""
from configs import sample as sample_config
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, period=2, rank=-1, svd="ca", mlp="layers", quick=False, xl2=False)
  if arg.rank < 0:
    arg.rank = 128 if arg.xl2 else 16  # every README example of the released code uses 128 on DiT-XL/2
  c = configlib.ml_collections.ConfigDict()
  c.job = "icc"
  c.params = "diffq/assets/dit_fm_ema.npz"  # the FP export, or a quantize job's quantized.npz
  c.num_devices = 0
  c.distributed = False
  c.icc = dict(ranks=dict(qkv=arg.rank, proj=arg.rank, fc1=arg.rank, fc2=arg.rank),  # per layer type; 0 = reuse
               svd=arg.svd,                   # plain | ca (channel magnitudes) | cd (their step increments)
               state_dtype="float32",         # the sampler state's dtype: float32 | bfloat16 (half the bytes)
               mlp=arg.mlp)                   # layers: fc1, fc2 apart (the paper) | chain: through the linear GELU
  # Channel statistics for CA/CD-SVD: the model's own DDIM trajectory (full steps, evaluation sampler, other seed).
  c.calib = dict(num_images=8, seed=1000, compute_dtype="float32")  # compute dtype of the statistics pass
  c.sample = sample_config.get_config("quick" if arg.quick else None)
  for k in ("job", "params", "num_devices", "distributed"):
    del c.sample[k]
  c.sample.cache_pattern = f"period:{arg.period}"
  if arg.quick:
    c.calib.num_images = 4
  if arg.xl2:
    _xl2(c)
  return c


def _xl2(c):
  """DiT-XL/2-256 with the released ICC sampler's defaults (sample_ddp_sp_step.py: DDIM 100, eta 0, CFG 1.5,
  period 2, rank 128, 50k samples; research/icc.md §5); outputs as configs/sample.py's `xl2_outputs`. The
  channel statistics come from the model's own trajectory (16 images), not from 256 ImageNet train images."""
  c.params = sample_config.XL2_PARAMS
  sample_config.xl2_outputs(c.sample)
  c.sample.method, c.sample.spacing, c.sample.eta, c.sample.cfg_scale = "ddim", "ddim100", 0.0, 1.5
  c.sample.num_samples, c.sample.batch_size = 50000, 64
  c.calib.num_images = 16
