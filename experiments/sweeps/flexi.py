"""FlexiDiT (weak patch-8 steps first, powerful patch-4 steps last) vs fewer-step DDIM and ICC on the embedded
model, under the protocol (experiments/PROTOCOL.md: N = 5000, DDIM 20 grid, CFG 3, seed 0). FlexiDiT rows sample
the committed fine-tune (diffq/assets/flexidit_fm.md) with the first `t_weak` of the 20 steps at patch 8 (both
guidance branches) and, for `_g` rows, the guidance branch weak up to step t_weak_guide; `flexi_t0` is its
powerful mode alone. Archived rows belong to the committed weights: delete experiments/results/flexi/flexi_*.json
when they change. The FP, fewer-step DDIM and ICC rows are the same commands as experiments/sweeps/icc.py's
(their archives are that sweep's). gmacs_per_image counts every network call of the plan (diffq/eval/flops.py)."""
NAME = "flexi"
COLUMNS = ["method", "t_weak", "t_weak_guide", "fid", "sfid", "is", "precision", "recall", "class_acc",
           "gmacs_per_image", "seconds"]
PARETO = [("gmacs_per_image", "fid")]
PARETO_GROUP = "method"

RUNS = [dict(name="fp", config="configs/sample.py", overrides={"seed": 0}, workdir="fp_seeds/fp_seed0",
             labels={"method": "DDIM-20 (FP)"})]
RUNS += [dict(name=f"ddim{n}", config="configs/sample.py", overrides={"seed": 0, "spacing": f"ddim{n}"},
              workdir=f"icc/ddim{n}", labels={"method": "fewer-step DDIM"})
         for n in (8, 10, 11, 12, 14)]
LATE_FULL = "FCCCFCCCFCCFCCFCFFFF"  # experiments/sweeps/icc.py's late-full pattern
RUNS += [dict(name=name, config=f"configs/dit_icc.py:rank={r},svd=ca", workdir=f"icc/{name}",
              overrides={"sample.seed": 0, "sample.cache_pattern": pattern}, labels={"method": "ICC (CA-SVD)"})
         for name, r, pattern in (("p2_r16_ca", 16, "period:2"), ("p3_r16_ca", 16, "period:3"),
                                  ("late_r8_ca", 8, LATE_FULL))]
# (t_weak, t_weak_guide): -1 = no weak-guided steps; t_weak = 0 is the powerful mode alone (the FP model, bit for
# bit, for the LoRA variant); the two weak-guided rows cost what 12 weak steps cost (43% fewer MACs)
WEAK = [(0, -1), (4, -1), (8, -1), (12, -1), (16, -1), (8, 16), (10, 14)]
RUNS += [dict(name=f"flexi_t{t}" + (f"_g{g}" if g >= 0 else ""), config=f"configs/dit_flexi.py:t_weak={t},t_weak_guide={g}",
              overrides={"seed": 0}, labels={"method": "FlexiDiT" + (" + weak guidance" if g >= 0 else ""),
                                              "t_weak": t, "t_weak_guide": g if g >= 0 else t})
         for t, g in WEAK]
