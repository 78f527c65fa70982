"""Additive vector quantization (AQLM's layer fit; AQUATIC-Diff's stage 1) vs scalar weights under the protocol
(experiments/PROTOCOL.md: N = 5000, DDIM 20, seed 0, CFG 3): FP; scalar uniform PTQ, EfficientDM-style and MPQ-DM
at W4A8, W3A8, W2A8; VQ (M x 8-bit codebooks over groups of 8 inputs, codebooks shared per layer type) at the
same code bits, and at W2A4 with rotated MoDiff activations next to MPQ-DM with the same activation part.
`bits_per_weight_total` counts every stored weight-quantizer array (scalar scales and zero points, VQ codebooks
and scales); A8 rows use the static per-step activation quantizer."""
NAME = "vq"
COLUMNS = ["setting", "method", "fid", "sfid", "is", "precision", "recall", "class_acc", "bits_per_weight",
           "bits_per_weight_total", "model_bytes", "vq_mean_error", "quant_seconds", "seconds"]
PIVOTS = [dict(rows="method", cols="setting", value="fid"), dict(rows="method", cols="setting", value="sfid"),
          dict(rows="method", cols="setting", value="bits_per_weight_total")]
PARETO = [("bits_per_weight_total", "fid")]
LINES = [dict(x="setting", y="fid", group="method", reference="fp", log_y=True)]
PROTOCOL = {"sample.num_samples": 5000, "sample.seed": 0}
# experiments/vq_allocate.py's greedy allocation at 2.0 average code bits (experiments/results/vq_allocation.md)
LAQ_W2 = "adaLN_modulation=1x8g8,attn/qkv=2x8g8,attn/proj=3x8g8,mlp/fc1=3x8g8,mlp/fc2=2x8g8"
GRID = {(4, 8)}  # scalar settings experiments/sweeps/quant_grid.py ran (wave 1's loop): reuse its runs

RUNS = [dict(name="fp", config="configs/sample.py", overrides={"seed": 0}, workdir="fp_seeds/fp_seed0",
             labels={"setting": "FP", "method": "float"})]
# uniform PTQ has no loop: it runs here, so its metrics carry bits_per_weight_total
RUNS += [dict(name=f"w{w}a8_{m}", config=f"configs/dit_w2a4.py:w={w},a=8,method={m},act=static"
                     + (",loop=wave1" if reuse else ",loop=fixed" if m == "mpqdm" else ""), overrides=PROTOCOL,
              labels={"setting": f"W{w}A8", "method": m + ("_wave1" if reuse else "")},
              **({"workdir": f"quant_grid/w{w}a8_{m}"} if reuse else {}))
         for w in (4, 3, 2) for m in ("uniform", "efficientdm", "mpqdm")
         for reuse in [(w, 8) in GRID and m != "uniform"]]
RUNS += [dict(name=f"w{w}a8_vq", config=f"configs/dit_vq.py:w={w},a=8", overrides=PROTOCOL,
              labels={"setting": f"W{w}A8", "method": "vq"}) for w in (4, 3, 2)]
# PV-tuning as AQLM's LLM recipe runs it (LAMB lrs 3e-4 / 1e-2, unweighted eps MSE, activation quantizers training),
# before experiments/results/pv_diag.md found the last step steering it and the steps too large at W3
PV_AQLM = {"distill.vq_lr": 3e-4, "distill.code_lr": 1e-2, "distill.loss_norm": "none", "distill.a_quant_lr": 5e-4}
RUNS += [dict(name=f"w{w}a8_vq_pv", config=f"configs/dit_vq.py:w={w},a=8,pv", overrides={**PROTOCOL, **PV_AQLM},
              labels={"setting": f"W{w}A8", "method": "vq_pv_aqlm"}) for w in (3, 2)]
RUNS += [dict(name=f"w{w}a8_vq_pv_xprev", config=f"configs/dit_vq.py:w={w},a=8,pv", overrides=PROTOCOL,  # the default
              labels={"setting": f"W{w}A8", "method": "vq_pv"}) for w in (4, 3, 2)]
# static A8 alone costs sFID (W8A8 21.04 vs FP 20.3-20.6, experiments/results/modiff.md): MoDiff activations
RUNS += [dict(name="w4a8_vq_pv_modiff", config="configs/dit_vq.py:w=4,a=8,act=modiff,pv", overrides=PROTOCOL,
              labels={"setting": "W4A8", "method": "vq_pv_modiff"}),
         dict(name="w2a8_vq_pv_adam", config="configs/dit_vq.py:w=2,a=8,pv",  # plain Adam steps (no LAMB)
              overrides={**PROTOCOL, **PV_AQLM, "distill.vq_lamb": False}, labels={"setting": "W2A8", "method": "vq_pv_adam"}),
         dict(name="w2a8_vq_pv_wave1", config="configs/dit_vq.py:w=2,a=8,pv,loop=wave1",
              overrides={**PROTOCOL, **PV_AQLM, "distill.vq_lamb": False}, labels={"setting": "W2A8", "method": "vq_pv_wave1"}),
         dict(name="w2a8_vq_kmeans16k", config="configs/dit_vq.py:w=2,a=8",  # the k-means start before AQLM's
              overrides={**PROTOCOL, "quant.vq.kmeans_points": 16384, "quant.vq.kmeans_tol": 0.001},
              labels={"setting": "W2A8", "method": "vq_kmeans16k"}),
         dict(name="w2a8_vq_laq", config="configs/dit_vq.py:w=2,a=8", overrides={**PROTOCOL, "quant.vq.layouts": LAQ_W2},
              labels={"setting": "W2A8", "method": "vq_laq"}),
         dict(name="w2a8_vq_beam4", config="configs/dit_vq.py:w=2,a=8", overrides={**PROTOCOL, "quant.vq.beam_size": 4},
              labels={"setting": "W2A8", "method": "vq_beam4"})]
RUNS += [dict(name=f"w2a8_vq_share_{share}", config="configs/dit_vq.py:w=2,a=8",
              overrides={**PROTOCOL, "quant.vq.share": share}, labels={"setting": "W2A8", "method": f"vq_{share}"})
         for share in ("none", "all")]
RUNS += [dict(name="w2a4_mpqdm_rotate_modiff_static", config="configs/dit_w2a4.py:w=2,a=4,method=mpqdm,act=rotate_modiff,loop=wave1",
              overrides={**PROTOCOL, "quant.modiff.quantizer": "static"}, workdir="modiff/w2a4_mpqdm_rotate_modiff_static",
              labels={"setting": "W2A4", "method": "mpqdm_wave1"}),
         dict(name="w2a4_mpqdm_rotate_modiff_fixed", config="configs/dit_w2a4.py:w=2,a=4,method=mpqdm,act=rotate_modiff,loop=fixed",
              overrides={**PROTOCOL, "quant.modiff.quantizer": "static"},  # the main command on the fixed loop
              labels={"setting": "W2A4", "method": "mpqdm"}),
         dict(name="w2a4_mpqdm_rotate_modiff_ptq", config="configs/dit_w2a4.py:w=2,a=4,method=mpqdm,act=rotate_modiff,loop=fixed",
              overrides={**PROTOCOL, "distill.trajectories": 0},  # OMQ bits and calibration, no distillation
              labels={"setting": "W2A4", "method": "mpqdm_ptq"}),
         dict(name="w2a4_vq_rotate_modiff", config="configs/dit_vq.py:w=2,a=4,act=rotate_modiff", overrides=PROTOCOL,
              labels={"setting": "W2A4", "method": "vq"}),
         dict(name="w2a4_vq_pv_rotate_modiff", config="configs/dit_vq.py:w=2,a=4,act=rotate_modiff,pv",
              overrides={**PROTOCOL, **PV_AQLM}, labels={"setting": "W2A4", "method": "vq_pv_aqlm"}),
         dict(name="w2a4_vq_pv_xprev_rotate_modiff", config="configs/dit_vq.py:w=2,a=4,act=rotate_modiff,pv",
              overrides=PROTOCOL, labels={"setting": "W2A4", "method": "vq_pv"})]  # the default PV recipe
