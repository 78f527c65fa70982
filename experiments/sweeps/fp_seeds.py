"""FP embedded model at the protocol setting (experiments/PROTOCOL.md) with three sampling seeds: the FP row and
the seed-to-seed noise floor."""
NAME = "fp_seeds"
COLUMNS = ["seed", "num_samples", "cfg_scale", "fid", "sfid", "is", "precision", "recall", "kid", "class_acc",
           "gmacs_per_image", "seconds"]
PARETO = [("gmacs_per_image", "fid")]
RUNS = [dict(name=f"fp_seed{s}", config="configs/sample.py", overrides={"seed": s}) for s in (0, 1, 2)]
# (fp_seed0 is also the FP row of experiments/sweeps/quant_grid.py, which points at the same run directory.)
