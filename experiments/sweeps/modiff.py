"""Activation parts for low-bit activations under the protocol (experiments/PROTOCOL.md: N = 5000, DDIM 20,
seed 0, CFG 3): the static per-step quantizer of wave 1, dynamic min-max, MoDiff with dynamic difference ranges
and MoDiff with calibrated per-step difference ranges (the Q-Diff variant), each of the static ones also after a
randomised block-Hadamard rotation of the inputs, per bit setting with its best weight method. MoDiff's first
step runs float activations (the released code's warm-up); per-tensor ranges throughout."""
NAME = "modiff"
COLUMNS = ["setting", "method", "act", "fid", "sfid", "is", "precision", "recall", "class_acc", "bits_per_weight",
           "state_bytes_per_image", "quant_seconds", "seconds"]
PIVOTS = [dict(rows="act", cols="setting", value="fid"), dict(rows="act", cols="setting", value="class_acc")]
LINES = [dict(x="setting", y="fid", group="act", reference="fp", log_y=True)]
SETTINGS = ((8, 8), (8, 6), (8, 4), (8, 3), (4, 8), (4, 4), (3, 4), (2, 4))
ACTS = {"static": dict(act="static"), "dynamic": dict(act="dynamic"), "modiff": dict(act="modiff", overrides={"quant.modiff.quantizer": "dynamic"}),
        "modiff_static": dict(act="modiff", overrides={"quant.modiff.quantizer": "static"}),
        "modiff_token": dict(act="modiff", overrides={"quant.modiff.quantizer": "dynamic",
                                                      "quant.act_granularity": "token"}),
        "modiff_static_late8": dict(act="modiff", overrides={"quant.modiff.quantizer": "static",
                                                             "quant.modiff.late_bits": 8, "quant.modiff.late_from": 16}),
        "rotate": dict(act="rotate"),
        "rotate_modiff_static": dict(act="rotate_modiff", overrides={"quant.modiff.quantizer": "static"}),
        "rotate_modiff_static_late8": dict(act="rotate_modiff", overrides={
            "quant.modiff.quantizer": "static", "quant.modiff.late_bits": 8, "quant.modiff.late_from": 16})}
# The best weight method of the quantization grid (experiments/results/quant_grid.md) at each setting: distillation
# makes W3A4/W4A4 worse than PTQ there (issue 12), MPQ-DM is the W2A4 command's method.
METHODS = {(2, 4): ("mpqdm",)}
GRID = {(8, 8), (4, 8), (4, 4), (3, 4), (2, 4)}  # settings the grid ran: their static rows are the grid's runs

RUNS = [dict(name="fp", config="configs/sample.py", overrides={"seed": 0}, workdir="fp_seeds/fp_seed0",
             labels={"setting": "FP", "act": "float"})]
RUNS += [dict(name=f"w{w}a{a}_{m}_{name}", config=f"configs/dit_w2a4.py:w={w},a={a},method={m},act={spec['act']}"
                     + (",loop=wave1" if m != "uniform" else ""),  # wave 1's distillation loop
              overrides={"sample.num_samples": 5000, "sample.seed": 0, **spec.get("overrides", {})},
              labels={"setting": f"W{w}A{a}", "method": m, "act": name},
              **({"workdir": f"quant_grid/w{w}a{a}_{m}"} if name == "static" and (w, a) in GRID else {}))
         for w, a in SETTINGS for m in METHODS.get((w, a), ("uniform",)) for name, spec in ACTS.items()]
