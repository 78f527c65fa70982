import json
import os
import subprocess
import sys

from experiments import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pareto_front():
  pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 6)]
  assert sweep.pareto_front(pts) == [0, 1, 3]


def test_sweep_runs_skips_finished_and_collects(tmp_path, monkeypatch):
  spec = tmp_path / "tiny_sweep.py"
  spec.write_text('"""Tiny sweep."""\nNAME = "tiny_sweep"\nCOLUMNS = ["num_samples", "seconds"]\n'
                  'PARETO = [("seconds", "num_samples")]\n'
                  'RUNS = [dict(name="a", config="configs/train_dit_fm.py:tiny", overrides={"num_steps": 1}),\n'
                  '        dict(name="b", config="configs/train_dit_fm.py:tiny", overrides={"num_steps": 2}),\n'
                  '        dict(name="c", config="configs/train_dit_fm.py:tiny", overrides={"num_steps": 2},\n'
                  '             workdir="tiny_sweep/b")]\n')
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path / "results"))
  runs = tmp_path / "runs"
  # "b" is already finished: the harness must not run it again
  os.makedirs(runs / "tiny_sweep" / "b")
  (runs / "tiny_sweep" / "b" / "metrics.json").write_text(json.dumps({"num_samples": 7, "seconds": 1.0}))
  mod = sweep.load_sweep(str(spec))
  env_cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); from experiments import sweep as s; "
             "s.RESULTS = %r; sys.argv = ['sweep', %r, '--runs_root=%s']; s.main()"
             % (ROOT, str(tmp_path / "results"), str(spec), str(runs))]
  out = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "b: done, skipping" in out.stdout and "c: done, skipping" in out.stdout  # c shares b's run
  assert json.load(open(runs / "tiny_sweep" / "a" / "metrics.json"))["steps"] == 1
  rows = sweep.collect(mod, str(runs))
  assert [r["name"] for r in rows] == ["a", "b", "c"] and rows[1]["num_samples"] == rows[2]["num_samples"] == 7
  table = (tmp_path / "results" / "tiny_sweep.md").read_text()
  assert "--config.num_steps=1" in table and (tmp_path / "results" / "tiny_sweep.csv").exists()
  assert (tmp_path / "results" / "tiny_sweep_num_samples_vs_seconds.png").exists()


def test_archived_metrics_keep_rows_and_skip_runs_without_run_dirs(tmp_path, monkeypatch):
  """A fresh clone has the committed archive but no run directories: rows stay, nothing is recomputed."""
  spec = tmp_path / "arch_sweep.py"
  spec.write_text('NAME = "arch_sweep"\nCOLUMNS = ["fid"]\n'
                  'LINES = [dict(x="setting", y="fid", group="method", reference="a", log_y=True)]\n'
                  'RUNS = [dict(name="a", config="configs/does_not_exist.py"),\n'
                  '        dict(name="b", config="configs/does_not_exist.py",\n'
                  '             labels={"setting": "W2", "method": "m"})]\n')
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path / "results"))
  runs = tmp_path / "runs"
  for name, fid in (("a", 1.5), ("b", 2.5)):
    os.makedirs(runs / "arch_sweep" / name)
    (runs / "arch_sweep" / name / "metrics.json").write_text(json.dumps({"fid": fid}))
  mod = sweep.load_sweep(str(spec))
  assert [r["fid"] for r in sweep.collect(mod, str(runs))] == [1.5, 2.5]
  assert json.load(open(tmp_path / "results" / "arch_sweep" / "b.json")) == {"fid": 2.5}
  fresh = tmp_path / "fresh_runs"  # no run directories at all
  rows = sweep.collect(mod, str(fresh))
  assert [r["fid"] for r in rows] == [1.5, 2.5] and rows[1]["method"] == "m" and "method" not in rows[0]
  sweep.draw_lines(mod, rows)
  assert (tmp_path / "results" / "arch_sweep_fid_by_method.png").exists()
  sweep.run_all(mod, str(fresh), None)  # the config does not exist: running anything would fail
  assert not fresh.exists()


def test_pivot_table_places_values_by_labels():
  rows = [dict(name="fp", fid=3.0), dict(name="a", method="m1", setting="W2", fid=9.0),
          dict(name="b", method="m2", setting="W2", fid=7.5), dict(name="c", method="m1", setting="W8", fid=3.25)]
  table = sweep.pivot_table(rows, "method", "setting", "fid")
  assert table[2:] == ["| method | W2 | W8 |", "|---|---|---|", "| m1 | 9 | 3.25 |", "| m2 | 7.5 |  |"]
