"""ICC (increment-calibrated caching) vs naive caching vs fewer-step DDIM on the FP embedded model, under the
protocol (experiments/PROTOCOL.md: N = 5000, DDIM 20 grid, CFG 3, seed 0). ICC and naive caching run the
DDIM-20 plan with step i full when i % period == 0 (p2, p3; the paper's schedule) or the late-full pattern, and
cached otherwise (rank 0 = naive reuse, FORA-style);
fewer-step DDIM runs every step in full on a coarser grid. gmacs_per_image counts every step by its kind."""
NAME = "icc"
COLUMNS = ["method", "schedule", "rank", "svd", "fid", "sfid", "is", "precision", "recall", "class_acc",
           "gmacs_per_image", "macs_vs_full", "cache_bytes_per_image", "icc_params", "seconds"]
PARETO = [("gmacs_per_image", "fid")]
PARETO_GROUP = "method"

RUNS = [dict(name="fp", config="configs/sample.py", overrides={"seed": 0}, workdir="fp_seeds/fp_seed0",
             labels={"method": "DDIM-20 (FP)", "macs_vs_full": 1.0})]
RUNS += [dict(name=f"ddim{n}", config="configs/sample.py", overrides={"seed": 0, "spacing": f"ddim{n}"},
              labels={"method": "fewer-step DDIM", "macs_vs_full": round(n / 20, 3)}) for n in (8, 10, 11, 12, 14)]
LATE_FULL = "FCCCFCCCFCCFCCFCFFFF"  # 11 cached steps, all early; the last four full (see icc_step_error.md)
ALT8 = "FCFCFCFCFCFCFCFCFFFF"  # 8 cached steps: naive caching at the MACs of ICC p2 r8/r16
ICC = [("p2", 0, "ca"), ("p3", 0, "ca"), ("late", 0, "ca"), ("p2", 8, "ca"), ("p2", 16, "ca"), ("p3", 16, "ca"),
       ("late", 8, "ca"), ("p2", 16, "plain"), ("p3", 16, "cd"), ("alt8", 0, "ca")]
PATTERNS = {"p2": "period:2", "p3": "period:3", "late": LATE_FULL, "alt8": ALT8}
RUNS += [dict(name=f"{sched}_r{r}" + (f"_{svd}" if r else ""), config=f"configs/dit_icc.py:rank={r},svd={svd}",
              overrides={"sample.seed": 0, "sample.cache_pattern": PATTERNS[sched]},
              labels={"method": "naive caching" if r == 0 else f"ICC ({svd.upper()}-SVD)" if svd != "plain"
                      else "ICC (plain SVD)", "schedule": sched, "rank": r, "svd": svd if r else "-"})
         for sched, r, svd in ICC]
# Wall-clock remedies (icc_speed.md): the attention branch reused (dead on cached steps) with ICC on the MLP only
# (fc1, fc2 apart, or chained through the linearised GELU), ICC everywhere with a chained MLP, and the cache state
# in bfloat16.
MLP_RUNS = [("late", 0, 8, "layers"), ("late", 0, 8, "chain"), ("late", 8, 8, "chain"), ("p2", 0, 8, "chain")]
RUNS += [dict(name=f"{sched}_attn{a}_{'chain' if mlp == 'chain' else 'mlp'}{r}_ca",
              config=f"configs/dit_icc.py:rank={r},svd=ca,mlp={mlp}",
              overrides={"sample.seed": 0, "sample.cache_pattern": PATTERNS[sched], "icc.ranks.qkv": a,
                         "icc.ranks.proj": a},
              labels={"method": ("naive" if a == 0 else "ICC") + " attention, ICC MLP" +
                      (" chained through GELU" if mlp == "chain" else ""), "schedule": sched, "rank": f"{a}/{r}",
                      "svd": "ca"}) for sched, a, r, mlp in MLP_RUNS]
RUNS += [dict(name="late_r8_ca_bf16", config="configs/dit_icc.py:rank=8,svd=ca",
              overrides={"sample.seed": 0, "sample.cache_pattern": LATE_FULL, "icc.state_dtype": "bfloat16"},
              labels={"method": "ICC (CA-SVD), bfloat16 state", "schedule": "late", "rank": 8, "svd": "ca"})]
