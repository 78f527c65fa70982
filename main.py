"""diffq entry point: python main.py --config=configs/X.py[:args] --workdir=DIR [--config.k=v ...]."""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.json, samples and exports.")
flags.DEFINE_string("coordinator_address", "", "Multi-process runs JAX cannot auto-detect: host:port of process 0.")
flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: the number of processes.")
flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's id, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = ("train", "sample", "evaluate", "quantize", "icc", "export_dit", "train_classifier", "encode_latents")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.job not in JOBS:
    raise app.UsageError(f"Unknown job {config.job!r}; known jobs: {JOBS}.")
  from diffq import parallel
  from diffq.jobs import common
  common.quiet_library_logs()
  parallel.maybe_initialize_distributed(config.get("distributed", False), FLAGS.coordinator_address,
                                        FLAGS.num_processes, FLAGS.process_id)
  import importlib
  job = importlib.import_module(f"diffq.jobs.{config.job}")
  logging.info("Config:\n%s", config)
  result = job.run(config, FLAGS.workdir)
  logging.info("Done: %s", result)


if __name__ == "__main__":
  app.run(main)
