"""FP embedded model: classifier-free guidance scale sweep (small N = 2000, seed 0, DDIM 20). Picks the one CFG
scale every later comparison uses (experiments/PROTOCOL.md)."""
NAME = "fp_cfg"
COLUMNS = ["cfg_scale", "num_samples", "fid", "sfid", "is", "precision", "recall", "kid", "class_acc",
           "gmacs_per_image", "seconds"]
PARETO = [("gmacs_per_image", "fid")]
RUNS = [dict(name=f"cfg{s}", config="configs/sample.py",
             overrides={"num_samples": 2000, "cfg_scale": s, "seed": 0}) for s in (1.0, 1.5, 2.0, 3.0, 4.0)]
