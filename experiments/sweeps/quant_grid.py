"""Quantized embedded DiT under the protocol (experiments/PROTOCOL.md: N = 5000, DDIM 20, seed 0, the protocol
CFG): FP, uniform PTQ, EfficientDM-style LoRA distillation, +OMQ, +TRD and MPQ-DM (OMQ + TRD) at W2A4, W3A4,
W4A4, W4A8 and W8A8. `bits_per_weight` counts every stored matmul/embedding weight (8-bit boundary layers and
the float label table included); `model_bytes` is the size of the exported arrays."""
NAME = "quant_grid"
COLUMNS = ["w_bits", "a_bits", "fid", "sfid", "is", "precision", "recall", "kid", "class_acc", "bits_per_weight",
           "model_bytes", "gmacs_per_image", "quant_seconds", "seconds"]
PARETO = [("bits_per_weight", "fid")]
LINES = [dict(x="setting", y="fid", group="method", reference="fp", log_y=True),
         dict(x="setting", y="class_acc", group="method", reference="fp")]
PIVOTS = [dict(rows="method", cols="setting", value="fid"), dict(rows="method", cols="setting", value="class_acc")]
METHODS = {"uniform": "uniform PTQ", "efficientdm": "EfficientDM-style", "omq": "+OMQ", "trd": "+TRD",
           "mpqdm": "MPQ-DM (OMQ+TRD)"}
SETTINGS = ((2, 4), (3, 4), (4, 4), (4, 8), (8, 8))

RUNS = [dict(name="fp", config="configs/sample.py", overrides={"seed": 0}, workdir="fp_seeds/fp_seed0")]
RUNS += [dict(name=f"w{w}a{a}_{m}", config=f"configs/dit_w2a4.py:w={w},a={a},method={m},act=static"
                     + (",loop=wave1" if m != "uniform" else ""),  # wave 1's distillation loop
              overrides={"sample.num_samples": 5000, "sample.seed": 0},
              labels={"setting": f"W{w}A{a}", "method": METHODS[m]})
         for w, a in SETTINGS for m in METHODS if not (w == 8 and m in ("omq", "mpqdm"))]  # OMQ: w_bits <= 7
