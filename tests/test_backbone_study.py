"""benchmarks/backbone_study.py's seeds, learning-rate sweep, resumable pieces and seeds report
(issue 22 item 2), on fake result rows: no training here (the CPU smoke run of the script is in
benchmarks/RESULTS.md's backbone-study section)."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIVE = ["hgrn2_3to1", "hgrn2_5to1", "gdn_3to1", "gdn_5to1", "transformer"]


@pytest.fixture(scope="module")
def study():
  path = os.path.join(ROOT, "benchmarks", "backbone_study.py")
  spec = importlib.util.spec_from_file_location("backbone_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _signature(study, steps=0):
  return study.study_signature("firm", study.SETTINGS["firm"], steps,
                               "mix:synthetic:mqar=0.6,synthetic:passkey=0.4")


def _row(study, variant, seed, lr, recall, loss=3.0, signature=None, curve=None, seconds=60.0):
  """A result row as run_variant writes it (the fields the report reads)."""
  return {"variant": variant, "seed": seed, "learning_rate": lr,
          "pattern": list(study.VARIANTS[variant]["pattern"]), "params": 9.5e6,
          "average_recall": recall, "mqar_accuracy": recall, "passkey_accuracy": recall,
          "final_loss": loss, "chance": 1 / 256, "steps": 500, "d_model": 256, "num_layers": 12,
          "train_seconds": seconds - 10, "eval_seconds": 10.0, "piece_seconds": seconds,
          "compile_seconds": 20.0, "seconds_per_step": 0.06,
          "curve": curve or [], "study": signature,
          "mqar": {"cells": [{"length": 64, "accuracy": recall}], "bag_chance": 0.1},
          "passkey": {"cells": []}}


def test_t_interval_on_known_numbers(study):
  ci = study.mean_ci([1.0, 2.0, 3.0])   # mean 2, s = 1, t(0.975, 2) = 4.302653
  assert ci["n"] == 3 and ci["mean"] == pytest.approx(2.0) and ci["sd"] == pytest.approx(1.0)
  assert ci["lo"] == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-6)
  assert ci["hi"] == pytest.approx(2 + 2.484138, abs=1e-5)
  ci = study.mean_ci([0.5, 0.7])        # t(0.975, 1) = 12.706: a two-seed interval is wide
  assert ci["hi"] - ci["lo"] == pytest.approx(2 * 12.706205 * math.sqrt(0.02) / math.sqrt(2))
  one = study.mean_ci([0.4])
  assert one["mean"] == 0.4 and one["lo"] is None and study.fmt_ci(one) == "40.0 (n=1)"
  assert study.fmt_ci(study.mean_ci([0.0, 0.0, 0.3])).startswith("10.0 [0.0, ")  # clipped
  assert study.mean_ci([])["mean"] is None
  with pytest.raises(ValueError):
    study.t975(0)


def test_interval_is_scipys_t_interval(study):
  from scipy import stats  # pylint: disable=import-outside-toplevel
  assert study.t975(2) == pytest.approx(4.302653, abs=1e-6)   # the table value for 3 seeds
  values = [0.61, 0.93, 0.72]
  lo, hi = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
  ci = study.mean_ci(values)
  assert (ci["lo"], ci["hi"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))


def test_piece_ids_and_plan_sweep_then_seeds(study):
  assert study.piece_id("gdn_3to1", 1, 3e-3) == "gdn_3to1/seed1/lr0.003"
  assert study.piece_id("gdn_3to1", 0, 1e-3) == "gdn_3to1/seed0/lr0.001"
  todo, chosen = study.plan_pieces(FIVE, [0, 1, 2], [1e-3, 3e-3], {})
  assert todo == [(v, 0, lr) for v in FIVE for lr in (1e-3, 3e-3)]   # the sweep comes first
  assert chosen == {v: None for v in FIVE}
  done = {}
  for v in FIVE[:2]:   # two variants swept: 3e-3 wins for one, 1e-3 for the other
    for lr, rec in ((1e-3, 0.2 if v == "hgrn2_3to1" else 0.6), (3e-3, 0.5)):
      done[study.piece_id(v, 0, lr)] = {"variant": v, "seed": 0, "learning_rate": lr,
                                        "average_recall": rec, "final_loss": 1.0}
  todo, chosen = study.plan_pieces(FIVE, [0, 1, 2], [1e-3, 3e-3], done)
  assert chosen["hgrn2_3to1"] == 3e-3 and chosen["hgrn2_5to1"] == 1e-3
  assert chosen["gdn_3to1"] is None   # its other seeds wait for its sweep
  assert todo[:6] == [(v, 0, lr) for v in FIVE[2:] for lr in (1e-3, 3e-3)]
  assert todo[6:] == [("hgrn2_3to1", 1, 3e-3), ("hgrn2_3to1", 2, 3e-3),
                      ("hgrn2_5to1", 1, 1e-3), ("hgrn2_5to1", 2, 1e-3)]
  todo, chosen = study.plan_pieces(["transformer"], [0, 1], [1e-3], {})   # no sweep: one lr
  assert todo == [("transformer", 0, 1e-3), ("transformer", 1, 1e-3)]
  assert chosen == {"transformer": 1e-3}


def test_lr_sweep_picks_best_from_result_files(study, tmp_path):
  sig = _signature(study)
  out = str(tmp_path)
  fake = {("gdn_3to1", 1e-3): (0.30, 3.0), ("gdn_3to1", 3e-3): (0.55, 2.0),
          ("transformer", 1e-3): (0.10, 3.4), ("transformer", 3e-3): (0.10, 3.5)}  # tie: loss
  for (v, lr), (rec, loss) in fake.items():
    d = tmp_path / v / "seed0" / study.lr_tag(lr)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(_row(study, v, 0, lr, rec, loss, sig)))
  # the single-seed layout of earlier runs: read as seed 0 at the setting's learning rate
  legacy = _row(study, "hgrn2_3to1", 0, 0, 0.7)
  del legacy["seed"], legacy["learning_rate"], legacy["study"]
  (tmp_path / "hgrn2_3to1").mkdir()
  (tmp_path / "hgrn2_3to1" / "result.json").write_text(json.dumps(legacy))
  done = study.gather_pieces(out, 1e-3, sig)
  assert set(done) == {"gdn_3to1/seed0/lr0.001", "gdn_3to1/seed0/lr0.003",
                       "transformer/seed0/lr0.001", "transformer/seed0/lr0.003",
                       "hgrn2_3to1/seed0/lr0.001"}
  todo, chosen = study.plan_pieces(["gdn_3to1", "transformer", "hgrn2_3to1"], [0, 1],
                                   [1e-3, 3e-3], done)
  assert chosen == {"gdn_3to1": 3e-3, "transformer": 1e-3, "hgrn2_3to1": None}
  assert todo == [("hgrn2_3to1", 0, 3e-3), ("gdn_3to1", 1, 3e-3), ("transformer", 1, 1e-3)]
  # a result of another study in OUT is an error, not silently mixed in
  other = _row(study, "gdn_5to1", 0, 1e-3, 0.5, signature={**sig, "steps": 1000})
  d = tmp_path / "gdn_5to1" / "seed0" / "lr0.001"
  d.mkdir(parents=True)
  (d / "result.json").write_text(json.dumps(other))
  with pytest.raises(ValueError, match="another study"):
    study.gather_pieces(out, 1e-3, sig)


def test_pieces_resume_skip_budget_and_bundle(study, tmp_path):
  sig = _signature(study)
  variants, seeds, lrs = ["hgrn2_3to1", "transformer"], [0, 1, 2], [1e-3, 3e-3]
  calls = []
  now = [0.0]

  def run_one(variant, seed, lr, workdir):   # 50 "seconds" a piece; writes result.json
    calls.append((variant, seed, lr))
    assert workdir == os.path.join(str(tmp_path / "a"), variant, f"seed{seed}", f"lr{lr:g}")
    now[0] += 50.0
    row = _row(study, variant, seed, lr, 0.8 if lr == 3e-3 else 0.4, signature=sig,
               seconds=50.0)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(row, f)
    return row

  out_a = str(tmp_path / "a")
  done = study.gather_pieces(out_a, 1e-3, sig) if os.path.isdir(out_a) else {}
  seen = []
  status = study.run_pieces(variants, seeds, lrs, out_a, done, run_one, max_seconds=175,
                            guess=40.0, clock=lambda: now[0], start=0.0,
                            on_piece=lambda row, d: seen.append(len(d)))
  # 40 s guess for the first, then 50 s measured: pieces start at 0, 50, 100 (100 + 50 <= 175)
  assert status["ran"] == ["hgrn2_3to1/seed0/lr0.001", "hgrn2_3to1/seed0/lr0.003",
                           "transformer/seed0/lr0.001"]
  assert seen == [1, 2, 3] and status["stopped"] is None
  assert "transformer/seed0/lr0.003" in status["deferred"]   # 40 s guess > 25 s left
  # the device returns one file; a fresh machine gets it back and skips what it holds
  study.write_pieces(str(tmp_path / "bundle.json"), done, sig)
  out_b = str(tmp_path / "b")
  assert study.import_pieces(out_b, study.read_pieces(str(tmp_path / "bundle.json"), sig)) == 3
  assert study.import_pieces(out_b, study.read_pieces(str(tmp_path / "bundle.json"), sig)) == 0
  done_b = study.gather_pieces(out_b, 1e-3, sig)
  assert set(done_b) == set(done)
  calls.clear()
  now[0] = 0.0
  status = study.run_pieces(variants, seeds, lrs, out_a, done_b, run_one, clock=lambda: now[0])
  assert calls[0] == ("transformer", 0, 3e-3)            # the rest, in order; nothing repeated
  assert sorted(calls[1:]) == sorted([(v, s, 3e-3) for v in variants for s in (1, 2)])
  assert len(done_b) == 8 and study.plan_pieces(variants, seeds, lrs, done_b)[0] == []
  with pytest.raises(ValueError, match="another study"):
    study.read_pieces(str(tmp_path / "bundle.json"), {**sig, "tokens_per_step": 1024})
  (tmp_path / "bad.json").write_text(json.dumps({"pieces": {}}))
  with pytest.raises(ValueError, match="not a backbone_pieces.json"):
    study.read_pieces(str(tmp_path / "bad.json"), sig)


def test_interrupted_piece_stops_and_failed_piece_is_skipped(study, tmp_path):
  def run_one(variant, seed, lr, workdir):
    if variant == "gdn_3to1":
      raise RuntimeError("boom")
    raise study.PieceInterrupted("stopped at step 120 of 500")

  done = {}
  status = study.run_pieces(["gdn_3to1", "transformer"], [0], [1e-3], str(tmp_path), done,
                            run_one)
  assert status["failed"] == {"gdn_3to1/seed0/lr0.001": "RuntimeError: boom"}
  assert status["stopped"] == "stopped at step 120 of 500" and status["ran"] == [] and not done


def _curve(acc_half, acc_3q, acc_end):
  return [{"fraction": f, "step": int(500 * f), "loss": 1.0, "accuracy": a}
          for f, a in ((0.5, acc_half), (0.75, acc_3q), (1.0, acc_end))]


def test_seeds_report_ranking_overlaps_and_verdict(study, tmp_path):
  sig = _signature(study)
  seeds, lrs = [0, 1, 2], [1e-3, 3e-3]
  recall = {"hgrn2_3to1": (0.90, 0.86, 0.88), "gdn_5to1": (0.40, 0.45, 0.50),
            "hgrn2_5to1": (0.41, 0.46, 0.52), "gdn_3to1": (0.30, 0.50, 0.40),
            "transformer": (0.10, 0.11, 0.09)}
  curves = {"hgrn2_3to1": _curve(0.5, 0.9, 0.95), "gdn_5to1": _curve(0.2, 0.3, 0.4),
            "hgrn2_5to1": _curve(0.3, 0.6, 0.5), "gdn_3to1": _curve(0.2, 0.55, 0.6),
            "transformer": _curve(0.1, 0.1, 0.1)}
  pieces = {}
  for v, values in recall.items():
    for s, rec in zip(seeds, values):
      pieces[study.piece_id(v, s, 3e-3)] = _row(study, v, s, 3e-3, rec, signature=sig,
                                                curve=curves[v])
    pieces[study.piece_id(v, 0, 1e-3)] = _row(study, v, 0, 1e-3, values[0] - 0.05,
                                              signature=sig)
  md, data = study.seeds_report(pieces, FIVE, seeds, lrs)
  assert data["variants"]["hgrn2_3to1"]["lr"] == 3e-3
  ci = data["variants"]["hgrn2_3to1"]["average_recall"]
  assert ci["mean"] == pytest.approx(0.88) and ci["n"] == 3
  assert ci["hi"] - ci["mean"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), abs=1e-6)
  lines = md.splitlines()
  ranking = [l for l in lines if l.startswith("| 1 |") or l.startswith("| 2 |")]
  assert ranking[0].startswith("| 1 | hgrn2_3to1 | 3 hgrn2 : 1 attn | 9.500M | 0.003 | 3 | "
                               "88.0 [83.0, 93.0] |")
  assert "| none | 86.7% (6.83M, 0.136 s) |" in ranking[0]   # apart from everyone
  gdn5 = next(l for l in lines if l.startswith("| ") and "| gdn_5to1 | 5 gdn : 1 attn |" in l)
  assert "hgrn2_5to1" in gdn5 and "gdn_3to1" in gdn5          # overlapping intervals named
  assert "| 0.001 **(chosen)** |" not in md and "| 0.003 **(chosen)** |" in md
  assert ("hgrn2_3to1: earlier 86.7%, here 88.0 [83.0, 93.0] over 3 seed(s): reproduced "
          "(inside the 95% interval).") in md
  assert "hgrn2_5to1: earlier 66.7%" in md and "refuted (outside the 95% interval)" in md
  assert ("Earlier ordering hgrn2_3to1 > hgrn2_5to1: reproduced (intervals apart, in that "
          "order).") in md
  assert ("Earlier ordering hgrn2_3to1 = gdn_5to1: refuted (hgrn2_3to1 is above, the intervals "
          "do not overlap).") in md
  assert ("Earlier ordering gdn_5to1 > hgrn2_5to1: not distinguishable (the intervals "
          "overlap).") in md
  assert "is refuted here** (1 of 3 orderings reproduced)" in md
  # hgrn2_5to1 and gdn_3to1 swap between 75% and 100% of the steps
  assert "still moved between 75% and 100% of the steps (hgrn2_5to1 / gdn_3to1 swapped)" in md


def test_verdict_not_distinguishable_and_one_seed(study):
  ci = study.mean_ci
  summary = {"hgrn2_3to1": {"average_recall": ci([0.5, 0.7, 0.6])},
             "gdn_5to1": {"average_recall": ci([0.55, 0.65, 0.6])},
             "hgrn2_5to1": {"average_recall": ci([0.4, 0.6, 0.5])}}
  lines = study.compare_with_earlier(summary)
  assert lines[-1].startswith("**The earlier table (hgrn2_3to1 86.7%, gdn_5to1 86.7%, "
                              "hgrn2_5to1 66.7%) is not distinguishable here**")
  assert any("hgrn2_3to1 = gdn_5to1: reproduced (not distinguishable here either)" in l
             for l in lines)
  one = study.compare_with_earlier({"hgrn2_3to1": {"average_recall": ci([0.9])},
                                    "hgrn2_5to1": {"average_recall": ci([0.2])}})
  assert "not determined (one seed: no interval)" in one[0]
  assert "reproduced (intervals apart, in that order)" in one[2]   # points, apart


def test_write_report_renders_and_exports(study, tmp_path):
  sig = _signature(study)
  out = tmp_path / "out"
  for v in ("hgrn2_3to1", "transformer"):
    for s in (0, 1):
      d = out / v / f"seed{s}" / "lr0.003"
      d.mkdir(parents=True)
      (d / "result.json").write_text(json.dumps(_row(study, v, s, 3e-3, 0.5 + 0.1 * s,
                                                      signature=sig)))
  export = tmp_path / "export"
  md = study.write_report(str(out), "firm", 9_500_000, {}, ["hgrn2_3to1", "transformer"],
                          [0, 1, 2], [3e-3], sig, export=str(export), echo=False)
  assert "| 1 | hgrn2_3to1 |" in md or "| 1 | transformer |" in md
  assert "Pieces not run yet (2): hgrn2_3to1/seed2/lr0.003, transformer/seed2/lr0.003." in md
  for name in ("backbone_pieces.json", "backbone_study.md", "backbone_study.json",
               "backbone_study.png"):
    assert (export / name).stat().st_size > 0, name
  bundle = study.read_pieces(str(export), sig)
  assert sorted(bundle) == ["hgrn2_3to1/seed0/lr0.003", "hgrn2_3to1/seed1/lr0.003",
                            "transformer/seed0/lr0.003", "transformer/seed1/lr0.003"]
  summary = json.loads((export / "backbone_study.json").read_text())
  assert summary["pieces_done"] == 4 and summary["pending"] == [
      "hgrn2_3to1/seed2/lr0.003", "transformer/seed2/lr0.003"]
  assert summary["variants"]["transformer"]["average_recall"]["n"] == 2


def test_train_curve_and_timing_from_metrics(study, tmp_path):
  records = [{"step": 0, "kind": "stage", "compile_seconds": 12.5}]
  records += [{"step": s, "kind": "train", "time": 100.0 + 0.5 * s, "loss": 5.0 - s / 100,
               "accuracy": s / 400} for s in range(1, 401)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  curve = study.train_curve(str(tmp_path))
  assert len(curve) == 20 and curve[-1]["step"] == 400
  by_fraction = {c["fraction"]: c for c in curve}
  for f in (0.5, 0.75, 1.0):    # the windows the ranking-stability check reads
    assert f in by_fraction
  # window (280, 300]: steps 281..300, mean accuracy 290.5 / 400
  assert by_fraction[0.75]["accuracy"] == pytest.approx(290.5 / 400)
  assert by_fraction[0.75]["loss"] == pytest.approx(5.0 - 2.905)
  timing = study.step_timing(str(tmp_path))
  assert timing == {"compile_seconds": 12.5, "seconds_per_step": pytest.approx(0.5)}
  assert study.train_curve(str(tmp_path / "none")) == []


def test_single_seed_report_is_the_old_table(study, tmp_path):
  """One seed and one learning rate: the table as before, from the single-seed layout too."""
  sig = study.study_signature("full", study.SETTINGS["full"], 0,
                              "mix:synthetic:mqar=0.6,synthetic:passkey=0.4")
  legacy = _row(study, "hgrn2_3to1", 0, 0, 0.707)
  del legacy["seed"], legacy["learning_rate"], legacy["study"]
  legacy["forward_seconds_2k"] = 0.0017
  legacy["steps"] = 498   # the steps it reached (the H100 table's sosm): still this study
  (tmp_path / "hgrn2_3to1").mkdir()
  (tmp_path / "hgrn2_3to1" / "result.json").write_text(json.dumps(legacy))
  new = _row(study, "transformer", 0, 1e-3, 0.193, signature=sig)
  new["forward_seconds_2k"] = 0.0011
  (tmp_path / "transformer" / "seed0" / "lr0.001").mkdir(parents=True)
  (tmp_path / "transformer" / "seed0" / "lr0.001" / "result.json").write_text(json.dumps(new))
  md = study.write_report(str(tmp_path), "full", 9_516_000, {}, ["hgrn2_3to1", "transformer"],
                          [0], [1e-3], sig, echo=False)
  lines = md.splitlines()
  assert lines[0].startswith("| variant | pattern | params | avg recall % |")
  assert lines[2].startswith("| hgrn2_3to1 | 3 hgrn2 : 1 attn | 9.500M | 70.7 |")
  assert lines[3].startswith("| transformer | attn only | 9.500M | 19.3 |")
  assert (tmp_path / "backbone_study.png").stat().st_size > 5000
  legacy["d_model"] = 32   # a quick-grid result in a full-grid OUT: refused
  (tmp_path / "hgrn2_3to1" / "result.json").write_text(json.dumps(legacy))
  with pytest.raises(ValueError, match="d_model: 32 here 256"):
    study.gather_pieces(str(tmp_path), 1e-3, sig)


class _FakeChild:
  """A piece 'running' from its launch until the fake clock reaches its end."""

  def __init__(self, now, seconds, row=None, error=None):
    self.now, self.end, self.row, self.error = now, now[0] + seconds, row, error
    self.terminated = self.waited = False

  def done(self):
    return self.now[0] >= self.end

  def result(self):
    if self.error is not None:
      raise self.error
    return self.row

  def terminate(self):
    self.terminated = True

  def wait(self, timeout):
    self.waited = True


def _fake_launcher(study, now, seconds, log, errors=None):
  """launch(variant, seed, lr, workdir) for run_pieces_parallel; `log` gets (event, key, time)."""
  sig = _signature(study)
  errors = errors or {}
  children = {}

  def launch(variant, seed, lr, workdir):
    key = study.piece_id(variant, seed, lr)
    log.append(("start", key, now[0]))
    row = _row(study, variant, seed, lr, 0.8 if lr == 3e-3 else 0.4, signature=sig)
    children[key] = _FakeChild(now, seconds(variant, seed, lr), row, errors.get(key))
    return children[key]
  return launch, children


def test_parallel_pieces_respect_workers_and_sweep_dependencies(study, tmp_path):
  variants, seeds, lrs = ["hgrn2_3to1", "gdn_3to1", "transformer"], [0, 1, 2], [1e-3, 3e-3]
  now, log, seen = [0.0], [], []
  # unequal durations, so pieces finish out of launch order
  launch, children = _fake_launcher(
      study, now, lambda v, s, lr: 30.0 + 10 * len(v) % 40 + 15 * s + (20 if lr == 3e-3 else 0),
      log)

  def sleep(seconds):
    now[0] += seconds
    for key, child in children.items():   # the scheduler notices a finish within one poll
      if child.done() and ("end", key) not in [(e, k) for e, k, _ in log]:
        log.append(("end", key, child.end))

  done = {}
  status = study.run_pieces_parallel(variants, seeds, lrs, str(tmp_path), done, launch, 3,
                                     clock=lambda: now[0], start=0.0, sleep=sleep, poll=5.0,
                                     on_piece=lambda row, d: seen.append(len(d)))
  assert status["stopped"] is None and not status["failed"] and not status["deferred"]
  assert len(status["ran"]) == len(done) == 3 * 4 and seen == list(range(1, 13))
  events = sorted(log, key=lambda e: (e[2], e[0] == "start"))   # at one time: ends first
  running, most = 0, 0
  for event, _, _ in events:
    running += 1 if event == "start" else -1
    most = max(most, running)
  assert most == 3                                    # never more than the 3 workers, and full
  starts = {k: t for e, k, t in log if e == "start"}
  ends = {k: t for e, k, t in log if e == "end"}
  assert [k for e, k, _ in log if e == "start"][:3] == [
      "hgrn2_3to1/seed0/lr0.001", "hgrn2_3to1/seed0/lr0.003", "gdn_3to1/seed0/lr0.001"]
  for v in variants:   # the other seeds at 3e-3 (the sweep's pick), once both sweep pieces ended
    sweep_end = max(ends[study.piece_id(v, 0, lr)] for lr in lrs)
    for s in (1, 2):
      assert starts[study.piece_id(v, s, 3e-3)] >= sweep_end
    assert study.piece_id(v, 1, 1e-3) not in starts
  # a later variant's sweep piece started before an earlier variant's seeds: slots never idle
  assert starts["transformer/seed0/lr0.001"] < starts["hgrn2_3to1/seed1/lr0.003"]


def test_parallel_pieces_defer_by_budget_and_record_failures(study, tmp_path):
  variants, seeds, lrs = ["hgrn2_3to1", "transformer"], [0, 1, 2], [1e-3, 3e-3]
  now, log = [0.0], []
  boom = study.ChildFailed("RuntimeError: boom", "child.log", "Traceback ...\nRuntimeError: boom")
  launch, _ = _fake_launcher(study, now, lambda v, s, lr: 50.0, log,
                             errors={"transformer/seed0/lr0.003": boom})
  done = {}
  status = study.run_pieces_parallel(
      variants, seeds, lrs, str(tmp_path), done, launch, 2, max_seconds=120, guess=40.0,
      clock=lambda: now[0], start=0.0, sleep=lambda s: now.__setitem__(0, now[0] + s), poll=5.0)
  # t=0: the hgrn2 sweep (40 s guess each); t=50: the transformer's (not timed: 40 s guess,
  # 50 + 40 <= 120); t=100: hgrn2's seeds need 50 s (timed here): 150 > 120, deferred
  assert [(k, t) for e, k, t in log] == [
      ("hgrn2_3to1/seed0/lr0.001", 0.0), ("hgrn2_3to1/seed0/lr0.003", 0.0),
      ("transformer/seed0/lr0.001", 50.0), ("transformer/seed0/lr0.003", 50.0)]
  assert status["ran"] == ["hgrn2_3to1/seed0/lr0.001", "hgrn2_3to1/seed0/lr0.003",
                           "transformer/seed0/lr0.001"]
  assert status["failed"] == {"transformer/seed0/lr0.003": "RuntimeError: boom"}
  assert status["deferred"] == ["hgrn2_3to1/seed1/lr0.003", "hgrn2_3to1/seed2/lr0.003"]
  assert status["stopped"] is None and set(done) == set(status["ran"])
  assert study.concurrent_guess(120, 1) == 120 and study.concurrent_guess(120, 3) == 240


def test_parallel_pieces_stop_on_signal_records_nothing_running(study, tmp_path):
  now, log = [0.0], []
  launch, children = _fake_launcher(
      study, now, lambda v, s, lr: 30.0 if v == "transformer" else 100.0, log)
  done = {}
  status = study.run_pieces_parallel(
      ["transformer", "gdn_3to1"], [0], [1e-3], str(tmp_path), done, launch, 2,
      clock=lambda: now[0], start=0.0, sleep=lambda s: now.__setitem__(0, now[0] + s),
      poll=10.0, stop_requested=lambda: "signal SIGTERM" if now[0] >= 60 else None)
  assert status["stopped"] == "signal SIGTERM" and status["ran"] == ["transformer/seed0/lr0.001"]
  assert list(done) == ["transformer/seed0/lr0.001"]
  gdn = children["gdn_3to1/seed0/lr0.001"]
  assert gdn.terminated and gdn.waited and not children["transformer/seed0/lr0.001"].terminated
  # a child that reports it was stopped (PieceInterrupted) stops the call the same way
  now[0], log[:] = 0.0, []
  launch, children = _fake_launcher(study, now, lambda v, s, lr: 20.0 if v == "gdn_3to1" else 90.0,
                                    log, errors={"gdn_3to1/seed0/lr0.001": study.PieceInterrupted(
                                        "stopped at step 3 of 500")})
  status = study.run_pieces_parallel(
      ["transformer", "gdn_3to1"], [0], [1e-3], str(tmp_path), {}, launch, 2,
      clock=lambda: now[0], start=0.0, sleep=lambda s: now.__setitem__(0, now[0] + s), poll=10.0)
  assert status["stopped"] == "stopped at step 3 of 500" and status["ran"] == []
  assert children["transformer/seed0/lr0.001"].terminated and now[0] == 20.0


def test_child_piece_statuses_and_kill(study, tmp_path):
  """ChildPiece on real processes: a result, a failure's reason, a stop, a child that ignores
  SIGTERM (killed after the grace)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  key = "gdn_3to1/seed1/lr0.003"
  workdir = str(tmp_path / key)
  result = os.path.join(workdir, "result.json")
  ok = study.ChildPiece([sys.executable, "-c", "import json; json.dump({'variant': 'x'}, "
                         f"open({result!r}, 'w'))"], workdir, key)
  ok.proc.wait()
  assert ok.done() and ok.result() == {"variant": "x"}
  fail = study.ChildPiece([sys.executable, "-c", f"print('== {key}'); print('{key} failed: "
                           "ValueError: bad width'); raise SystemExit(1)"], workdir, key)
  fail.proc.wait()
  with pytest.raises(study.ChildFailed) as info:
    fail.result()
  assert info.value.reason == "ValueError: bad width"
  assert "== gdn_3to1/seed1/lr0.003" in info.value.log_tail   # the log keeps every attempt
  assert study.child_failure_reason("x\nSegmentation fault\n", key, -11) == (
      "child exited with status -11: Segmentation fault")
  stop = study.ChildPiece([sys.executable, "-c", "raise SystemExit(3)"], workdir, key)
  stop.proc.wait()
  with pytest.raises(study.PieceInterrupted):
    stop.result()
  stubborn = study.ChildPiece([sys.executable, "-c", "import signal, time; signal.signal("
                               "signal.SIGTERM, signal.SIG_IGN); print('rea' + 'dy', flush=True); "
                               "time.sleep(60)"], workdir, key)
  while "ready" not in open(stubborn.log).read():   # (not in the command line it logs)
    time.sleep(0.05)
  t0 = time.monotonic()
  study.stop_pieces([stubborn], grace=0.5)
  assert stubborn.proc.returncode == -9 and time.monotonic() - t0 < 5
  assert subprocess.run(["kill", "-0", str(stubborn.proc.pid)], check=False).returncode != 0


def test_child_command_carries_the_study(study):
  argv = study.child_argv("gdn_3to1", 2, 3e-3, "/o", "firm", 0,
                          "mix:synthetic:mqar=0.6,synthetic:passkey=0.4", 64)
  assert argv[2:] == ["--setting=firm", "--variants=gdn_3to1", "--seeds=2", "--lrs=0.003",
                      "--steps=0", "--task_mix=mix:synthetic:mqar=0.6,synthetic:passkey=0.4",
                      "--eval_batch_size=64", "--out=/o", "--single_piece"]
  assert study.child_argv("gdn_3to1", 0, 1e-3, "/o", "quick", 3, "m", 16, "bfloat16")[-1] == (
      "--dtype=bfloat16")
  assert study.child_argv("gdn_3to1", 0, 1e-3, "/o", "quick", 3, "m", 16, "", 0)[-1] == (
      "--forward_repeats=0")
  env = study.child_env(3, base={"PATH": "/bin"})
  assert env == {"PATH": "/bin", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300",
                 "PYTHONUNBUFFERED": "1"}


def test_piece_in_a_child_equals_the_piece_in_process(tmp_path):
  """--workers=2 (two pieces, each in a child process) and --workers=1 (in this process) record
  the same numbers for one piece (the tiny quick setting, 3 steps; CPU runs are deterministic)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  common = [sys.executable, os.path.join(ROOT, "benchmarks", "backbone_study.py"),
            "--setting=quick", "--variants=transformer", "--lrs=3e-3", "--steps=3",
            "--forward_repeats=0"]   # no forward timing: nothing here reads it
  runs = {"children": ["--seeds=0,1", "--workers=2", "--max_seconds=600",
                       f"--export={tmp_path / 'export'}"],
          "in_process": ["--seeds=1", "--workers=1"]}
  # one CPU device: the study's mesh is one device (conftest simulates 8 for other tests)
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")))
  # both runs at once (wall time about the longer one's, not the sum): they write apart
  procs = {name: subprocess.Popen(common + [f"--out={tmp_path / name}"] + extra, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
           for name, extra in runs.items()}
  logs = {}
  try:
    for name, proc in procs.items():
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, out[-3000:] + err[-3000:]
      logs[name] = out
  finally:
    for proc in procs.values():
      proc.kill()
  assert "this call: 2 pieces run, 0 deferred (time budget), 0 failed" in logs["children"]
  assert logs["children"].count("[piece ") == 2
  piece = os.path.join("transformer", "seed1", "lr0.003")
  rows = {}
  for name in runs:
    with open(tmp_path / name / piece / "result.json") as f:
      rows[name] = json.load(f)
  assert os.path.exists(tmp_path / "children" / piece / "child.log")
  assert not os.path.exists(tmp_path / "in_process" / piece / "child.log")
  a, b = rows["children"], rows["in_process"]
  assert a["study"] == b["study"] and a["params"] == b["params"] and a["seed"] == 1
  for k in ("final_loss", "average_recall", "mqar_accuracy", "passkey_accuracy"):
    assert a[k] == b[k], k
  assert [c["loss"] for c in a["curve"]] == [c["loss"] for c in b["curve"]]
  assert ([c["accuracy"] for c in a["mqar"]["cells"]]
          == [c["accuracy"] for c in b["mqar"]["cells"]])
  # the parent's report and bundle hold both pieces
  with open(tmp_path / "export" / "backbone_pieces.json") as f:
    assert sorted(json.load(f)["pieces"]) == ["transformer/seed0/lr0.003",
                                              "transformer/seed1/lr0.003"]
