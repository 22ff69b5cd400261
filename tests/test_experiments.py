"""The paper's sweeps (configs/paper.py) and the experiments/ figure and table scripts, end to end on the
tiny model: one real tiny sweep holding every artefact's cells, then every script on its results store, with
the numbers the scripts print checked against the stored records."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from lora_squeeze import results as R
from lora_squeeze import results_render
from lora_squeeze import sweep
from lora_squeeze.workdir import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _paper(arg):
  return _module(ROOT / "configs" / "paper.py").get_config(arg)


def _script(name):
  return _module(ROOT / "experiments" / f"{name}.py")


def test_paper_scale_cells():
  c = _paper("artefact=table1")
  cells = sweep.cells_of(c)  # checks names unique and every '@source' exists
  per_task = [x for x in cells if x["overrides"]["data.task"] == "mmlu"]
  # zero-shot, direct r128, direct r1, Post 128->1, and for M in (200, 700): direct N+M, Cont, In std, In min
  assert len(per_task) == 4 + 2 * 4 and len(cells) == 13 * 12
  assert c.model == "gemma3_4b" and c.data.max_len == 1024 and c.data.batch_size == 8 and c.warmup_steps == 1000
  steps = {x["name"]: x["overrides"].get("steps") for x in per_task}
  assert steps["mmlu_s42_direct_r1_lr0.01"] == 15_000 and steps["mmlu_s42_direct_r1_lr0.01_n15700"] == 15_700
  arc = {x["name"]: x["overrides"] for x in cells if x["overrides"]["data.task"] == "arc_e"}
  assert arc["arc_e_s42_direct_r1_lr0.01"]["steps"] == 10_000
  assert arc["arc_e_s42_in_min_steps_128to1_m700"]["scheme"] == "min_steps"
  assert arc["arc_e_s42_cont_128to1_m200"]["source_workdir"] == "@arc_e_s42_direct_r128_lr0.01"
  heat = sweep.cells_of(_paper("artefact=heatmap,tasks=arc_e"))
  assert len(heat) == 8 + 8 * 2  # direct at 8 ranks, Post from each of 8 sources, efficient and rsvd
  assert {x["overrides"].get("squeeze.method") for x in heat} == {None, "efficient", "rsvd"}
  grid = sweep.cells_of(_paper("artefact=lr_grid,tasks=arc_e,seeds=42+43+44"))
  assert len(grid) == 8 * 5 * 3
  union = sweep.cells_of(_paper("artefact=heatmap+table1,tasks=arc_e"))
  assert len(union) == 24 + 12 - 2  # the direct r128 and r1 cells are shared
  local = _paper("artefact=heatmap,runlocal")
  assert local.model == "gemma3_270m" and local.data.source == "olmo"
  assert {x["overrides"]["data.task"] for x in local.sweep} == {"arc_e", "obqa", "siqa"}
  with pytest.raises(ValueError, match="artefact"):
    _paper("artefact=fig99")
  with pytest.raises(ValueError, match="RANK:RATE"):
    _paper("artefact=heatmap,lrs=0.1")


# Every artefact's cells at the smallest size that still exercises them: ranks 2 and 1, one source rank,
# both squeeze methods, the Table 1 columns; then a second sweep into the same store adding a second learning
# rate and a second seed at rank 1 (Table 2 / Table 3). Shared cells (the direct runs) run once.
TINY = "tiny,artefact=heatmap+table1,ranks=2+1,sources=2,lr=0.1,steps=8,extra=4"
TINY_SEEDS = "tiny,artefact=lr_grid,ranks=1,lr_grid=0.03+0.1,seeds=42+43,steps=8"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A real tiny results store holding the cells of every artefact."""
  d = tmp_path_factory.mktemp("paper_tiny")
  records = {}
  for arg in (TINY, TINY_SEEDS):
    config = _paper(arg)
    config.eval.limit = 16
    records.update(sweep.run_sweep(config, d))
  failed = {k: v["error"] for k, v in records.items() if v["status"] != "ok"}
  assert not failed, failed
  assert len(records) == 10 + 3
  return d


def _record(store, name):
  return json.loads((store / "results" / f"{name}.json").read_text())["result"]


def test_rows_from_the_store(store):
  rows = R.load_rows([store])
  methods = {r.method for r in rows}
  assert methods == set(R.METHODS)
  zs = [r for r in rows if r.method == "zero_shot"]
  assert len(zs) == 1 and all(0.0 <= r.accuracy <= 1.0 and r.n == 16 for r in zs)
  post = [r for r in rows if r.method == "post_squeeze" and r.source_rank == 2 and r.rank == 2]
  assert post and all(abs(r.retention - 1.0) < 1e-6 for r in post)  # V_r(r -> r) = 1 by definition
  cont = [r for r in rows if r.method == "cont_squeeze"]
  assert cont and all(r.steps == 8 + 4 and r.source_rank == 2 and r.rank == 1 for r in cont)
  ins = [r for r in rows if r.method.startswith("in_squeeze")]
  assert ins and all(r.steps == 12 and r.source_rank == 2 and r.rank == 1 for r in ins)
  best = R.best_direct_lr(rows)
  assert set(best) == {1, 2} and best[2] == 0.1 and best[1] in (0.03, 0.1)
  with pytest.raises(FileNotFoundError, match="neither a sweep directory"):
    R.load_rows([store / "nope"])


def test_lr_from_reads_the_best_rates(store, tmp_path):
  """lr_from: the config holds references; the sweep reads the store's best rates when it runs."""
  best = R.best_direct_lr(R.load_rows([store]))
  c = _paper(f"tiny,artefact=heatmap,ranks=2+1,sources=2,lr_from={store}")
  lrs = {
      x["overrides"]["lora.rank"]: sweep.cell_config(c, x, tmp_path).learning_rate
      for x in c.sweep
      if x["overrides"]["mode"] == "direct"
  }
  assert lrs == best
  ran = []

  def fake_run(cfg, workdir, **_):
    ran.append(cfg.learning_rate)
    return {"metrics": {"accuracy": 0.5}}

  records = sweep.run_sweep(_paper(f"tiny,artefact=direct,ranks=2+1,lr_from={store}"), tmp_path, run_fn=fake_run)
  assert set(records) == {"synthetic_s42_direct_r2_lrbest", "synthetic_s42_direct_r1_lrbest"} and ran == [
      best[2],
      best[1],
  ]
  record = records["synthetic_s42_direct_r1_lrbest"]
  assert record["overrides"]["learning_rate"] == {"best_lr_from": str(store), "rank": 1}
  assert record["settings"]["learning_rate"] == best[1]
  # the same cell with the rate written out has the same fingerprint; a rerun skips the finished cells
  explicit = _paper(f"tiny,artefact=direct,ranks=1,lrs=1:{best[1]}")
  same = sweep.run_cell(explicit, explicit.sweep[0], tmp_path / "explicit", run_fn=fake_run)
  assert same["fingerprint"] == record["fingerprint"]
  ran.clear()
  sweep.run_sweep(_paper(f"tiny,artefact=direct,ranks=2+1,lr_from={store}"), tmp_path, run_fn=fake_run)
  assert not ran
  # a rank the store has no rate for: one error naming the cell and the store's ranks, before any cell runs
  with pytest.raises(UserError, match=r"'synthetic_s42_direct_r4_lrbest'.* no finished direct run at rank 4 .*1, 2"):
    sweep.run_sweep(_paper(f"tiny,artefact=direct,ranks=2+4,lr_from={store}"), tmp_path / "r4", run_fn=fake_run)
  assert not ran and not (tmp_path / "r4" / "results").exists()
  with pytest.raises(UserError, match="lr_from=.*nope"):
    sweep.run_sweep(
        _paper(f"tiny,artefact=direct,ranks=1,lr_from={tmp_path / 'nope'}"), tmp_path / "n", run_fn=fake_run
    )


def test_lr_from_by_nll(store, tmp_path):
  """lr_rule=nll: the references say so, and the sweep resolves them to the lowest held-out NLL's rate; a
  misspelt rule is one error naming the valid ones."""
  by_nll = R.best_direct_lr(R.load_rows([store]), by="nll")
  c = _paper(f"tiny,artefact=direct,ranks=2+1,lr_from={store},lr_rule=nll")
  assert all(x["overrides"]["learning_rate"]["by"] == "nll" for x in c.sweep)
  lrs = {x["overrides"]["lora.rank"]: sweep.cell_config(c, x, tmp_path).learning_rate for x in c.sweep}
  assert lrs == by_nll
  with pytest.raises(UserError, match="'nlll'.*accuracy, nll.*did you mean 'nll'"):
    _paper(f"tiny,artefact=direct,ranks=1,lr_from={store},lr_rule=nlll")


def test_fig4_gain_matches_records(store, tmp_path):
  out = tmp_path / "out"
  assert _script("fig4_heatmap").main(["--results", str(store), "--out", str(out)]) == 0
  assert (out / "fig4_heatmap.png").stat().st_size > 1000
  rows = R.load_rows([store])
  best = R.best_direct_lr(rows)
  post = _record(store, "synthetic_s42_post_from2_efficient")["targets"]["1"]["metrics"]["accuracy"]
  # the direct baseline at r=1: its best rate, seeds averaged (the lr_grid sweep added seed 43)
  direct = [_record(store, f"synthetic_s{s}_direct_r1_lr{best[1]:g}")["metrics"]["accuracy"] for s in (42, 43)]
  gain = 100 * (post - sum(direct) / 2)
  md = (out / "fig4_heatmap.md").read_text()
  row = next(line for line in md.splitlines() if line.startswith("| 2 |"))  # r_src = 2; columns r_tgt 1, 2
  assert row.split("|")[2].strip() == f"{gain:+.1f}", (row, gain)


def test_table2_best_rate_follows_the_rate_rule(store, tmp_path):
  rows = R.load_rows([store])
  for rule in R.RATE_RULES:
    out = tmp_path / rule
    assert _script("table2_lr_grid").main(["--results", str(store), "--out", str(out), "--rate-rule", rule]) == 0
    md = (out / "table2_lr_grid.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 1 |"))  # rank 1: rates 0.03 and 0.1
    n = min(r.steps for r in rows if r.method == "direct")
    best = R.best_direct_lr([r for r in rows if r.method == "direct" and r.steps == n], by=rule)[1]
    assert row.split("|")[-2].strip() == f"{best:g}", (rule, row)
    assert R.rate_rule_text(rule) in md and "Held-out NLL" in md


def test_every_script_writes_md_and_png(store, tmp_path):
  out = tmp_path / "out"
  for name in (
      "fig3_lr_transfer",
      "fig5_efficient_vs_standard",
      "fig6_retention",
      "table1_methods",
      "table2_lr_grid",
      "table3_seeds",
  ):
    assert _script(name).main(["--results", str(store), "--out", str(out), "--title", "tiny"]) == 0, name
    assert (out / f"{name}.png").stat().st_size > 1000, name
    assert "Computed from" in (out / f"{name}.md").read_text(), name
  t1 = (out / "table1_methods.md").read_text()
  for col in (
      "0-S",
      "direct r=1, N=8",
      "direct r=1, N+4",
      "Post-Squeeze 2→1",
      "Cont-Squeeze +4",
      "In-Squeeze std +4",
      "In-Squeeze min-steps +4",
  ):
    assert col in t1, col
  assert "**" in t1  # best per row in bold
  t3 = (out / "table3_seeds.md").read_text()
  accs = [_record(store, f"synthetic_s{s}_direct_r1_lr0.03")["metrics"]["accuracy"] for s in (42, 43)]
  assert f"{100 * R.mean(accs):.2f} ± {100 * R.sem(accs):.2f}" in t3
  ret = (out / "fig6_retention.md").read_text()
  assert "100.0" in ret  # V_r(2 -> 2)


@pytest.mark.parametrize("rule", R.RATE_RULES)
def test_claims_pair_the_records(store, tmp_path, rule):
  """experiments/claims.py: every claim the store has cells for, and the paired NLL difference it prints for
  Post-Squeeze 2 -> 1 vs direct r=1 equals the per-example records' (direct: its best rate by --rate-rule,
  the same seed)."""
  out = tmp_path / "out"
  assert _script("claims").main(["--results", str(store), "--out", str(out), "--rate-rule", rule]) == 0
  assert (out / "claims.png").stat().st_size > 1000
  md = (out / "claims.md").read_text()
  for label in (
      "Post-Squeeze 2→1",
      "efficient (Alg. 2)",
      "Cont-Squeeze 2→1 +4",
      "In-Squeeze standard 2→1",
      "In-Squeeze min-steps 2→1",
      "| 2→1 | yes |",
  ):
    assert label in md, label
  assert R.rate_rule_text(rule) in md
  best = R.best_direct_lr(R.load_rows([store]), by=rule)[1]
  post = _record(store, "synthetic_s42_post_from2_efficient")["targets"]["1"]["metrics"]["per_example"]
  # Direct r=1 ran seeds 42 and 43, the Post-Squeeze source seed 42 only: seed 42 is paired with seed 42.
  direct = _record(store, f"synthetic_s42_direct_r1_lr{best:g}")["metrics"]["per_example"]
  diffs = [p - d for p, d in zip(post["gold_nll"], direct["gold_nll"])]
  row = next(line for line in md.splitlines() if "| Post-Squeeze 2→1 | direct r=1 |" in line)
  assert "| synthetic | 42 |" in row and f"{R.mean(diffs):+.4f} ± {R.sem(diffs):.4f}" in row, (row, R.mean(diffs))


def test_paired_differences():
  def row(task, nll, correct, **kw):
    return R.Row(
        store="s",
        cell="c",
        task=task,
        model="m",
        method="direct",
        rank=1,
        source_rank=None,
        learning_rate=0.1,
        seed=42,
        steps=8,
        squeeze_method=None,
        accuracy=None,
        ci95=None,
        n=len(nll),
        per_example={"gold_nll": nll, "correct": correct},
        **kw,
    )

  a = [row("t1", [1.0, 2.0, 3.0], [1, 1, 0]), row("t2", [0.5], [1])]
  b = [row("t1", [1.0, 1.0, 1.0], [0, 1, 0]), row("t3", [9.0], [0])]
  p = R.paired(a, b)  # only t1 is in both
  assert p.tasks == ("t1",) and p.n == 3
  assert p.nll == pytest.approx(1.0) and p.nll_sem == pytest.approx(1.0 / math.sqrt(3))
  assert p.accuracy == pytest.approx(1 / 3)
  assert R.paired(a[1:], b[:1]) is None
  with pytest.raises(ValueError, match="same held-out examples"):
    R.paired([row("t1", [1.0, 2.0], [1, 1])], b[:1])


def test_paired_compares_each_seed_with_itself_and_counts_the_seeds_spread():
  row = lambda seed, nll, correct=(1, 0, 1, 0): R.Row(
      store="s", cell=f"c{seed}", task="t", model="m", method="direct", rank=1, source_rank=None,
      learning_rate=0.1, seed=seed, steps=8, squeeze_method=None, accuracy=None, ci95=None, n=len(nll),
      per_example={"gold_nll": list(nll), "correct": list(correct)},
  )  # fmt: skip
  base = [1.0, 2.0, 3.0, 4.0]
  # A − B per example: seed 42 +0.1 +- a little, seed 43 -0.3 +- a little; B's seed 44 has no A partner.
  a = [
      row(42, [x + 0.1 + 0.01 * i for i, x in enumerate(base)]),
      row(43, [x - 0.3 + 0.01 * i for i, x in enumerate(base)]),
  ]
  b = [row(42, base), row(43, base), row(44, [9.0] * 4, (0, 0, 0, 0))]
  p = R.paired(a, b)
  assert p.seeds == (42, 43) and p.n == 4
  by_seed = {s: (nll, nll_sem) for s, nll, nll_sem, _, _ in p.per_seed}
  assert by_seed[42][0] == pytest.approx(0.115) and by_seed[43][0] == pytest.approx(-0.285)
  assert p.nll == pytest.approx(-0.085)
  # The examples' SEM of the seed-averaged differences is tiny; the seeds' spread (0.2 = |0.4| / 2) dominates.
  examples_sem = R.sem([-0.1 + 0.01 * i for i in range(4)])
  assert p.nll_sem == pytest.approx(math.sqrt(examples_sem**2 + 0.2**2))
  assert p.accuracy == 0.0 and p.accuracy_sem == 0.0  # B's seed 44 (all wrong) is not compared
  # Pooling the seeds as examples (the old rule) would have called this difference significant.
  assert abs(p.nll) < 2 * p.nll_sem and abs(p.nll) > 2 * examples_sem
  # No shared seed (a training-free B): each side's rows averaged per example, no per-seed entries.
  zero_shot = [row(0, base)]
  q = R.paired(a, zero_shot)
  assert q.seeds == () and q.nll == pytest.approx(-0.085) and q.nll_sem == pytest.approx(examples_sem)
  with pytest.raises(ValueError, match="same held-out examples"):
    R.paired([row(42, base), row(43, base[:3], (1, 0, 1))], [row(42, base), row(43, base[:3], (1, 0, 1))])


def test_no_difference_verdicts_allow_float_rounding_but_not_real_differences():
  v = _script("claims")._verdict
  assert v(3.6e-6, 1.5e-6, True, True, 1e-3) == "equivalent (within ±0.001)"  # rounding, 2.4 SEM from 0
  assert v(0.004, 0.001, True, True, 1e-3) == "differ (+4.0 SEM)"
  assert v(0.0015, 0.001, True, True, 1e-3) == "no significant difference"
  assert v(-0.05, 0.01, True) == "A better" and v(-0.01, 0.01, True) == "not significant"


def test_per_task_averages_each_seed_once():
  """Two records of one seed's adapter (a Post-Squeeze to r in two sweeps' cells) count once: seeds are
  averaged, not rows (Table 1's Post-Squeeze column read 41.7 where Table 3 read 41.54 over the same seeds)."""
  row = lambda seed, acc: R.Row(
      store="s", cell=f"c{seed}", task="t", model="m", method="post_squeeze", rank=1, source_rank=32,
      learning_rate=0.1, seed=seed, steps=8, squeeze_method="efficient", accuracy=acc, ci95=None, n=10,
  )  # fmt: skip
  rows = [row(42, 0.5), row(42, 0.5), row(43, 0.2), row(44, 0.2)]
  assert R.per_task(rows, lambda r: 0)[0]["t"] == pytest.approx(0.3)  # rows would give 0.35


def test_pooled_comparisons_count_each_example_once():
  """Fig. 4's pooled row: comparisons that reuse the same held-out examples are averaged per example, so n is
  the number of distinct examples and the SEM is that of the per-example means (not of the comparisons'
  examples side by side, which would count every reuse as a new example)."""
  row = lambda nll, correct: R.Row(
      store="s", cell="c", task="t", model="m", method="direct", rank=1, source_rank=None, learning_rate=0.1,
      seed=42, steps=8, squeeze_method=None, accuracy=None, ci95=None, n=len(nll),
      per_example={"gold_nll": list(nll), "correct": list(correct)},
  )  # fmt: skip
  rng = np.random.default_rng(0)
  base = rng.normal(3.0, 1.0, 50)
  shared = rng.normal(-0.05, 0.2, 50)  # the examples' own effect, common to every comparison
  comps, per_comp = [], []
  for k in range(3):
    d = shared + rng.normal(0.0, 0.02, 50)
    per_comp.append(d)
    comps.append(([row(base + d, [1] * 50)], [row(base, [1] * 50)]))
  p = R.pooled(comps)
  assert p.n == 50 and p.comparisons == 3
  per_example = np.mean(per_comp, axis=0)
  assert p.nll == pytest.approx(per_example.mean())
  assert p.nll_sem == pytest.approx(R.sem(list(per_example)))
  side_by_side = R.sem(list(np.concatenate(per_comp)))  # 150 "examples": about sqrt(3) too small
  assert p.nll_sem > 1.5 * side_by_side
  assert R.pooled(comps[:1]) == R.paired(*comps[0])
  with pytest.raises(ValueError, match="same held-out examples"):
    R.pooled(comps + [([row(base[:10], [1] * 10)], [row(base[:10], [1] * 10)])])


def test_appendix_e_reproduces_the_papers_numbers(tmp_path):
  assert _script("appE_flops").main(["--out", str(tmp_path)]) == 0
  md = (tmp_path / "appE_flops.md").read_text()
  assert "| full SVD of ΔW | 8.6B | ~8.6B |" in md
  assert "| RSVD of ΔW | 75.5M | ~75.5M |" in md
  assert "| memory-efficient (Alg. 2) | 16.8M | ~16.8M |" in md
  assert "gemma3_12b" in md and (tmp_path / "appE_flops.png").exists()


def test_sem_and_bold():
  assert math.isclose(R.sem([1.0, 2.0, 3.0]), 1.0 / math.sqrt(3))
  assert math.isnan(R.sem([1.0]))
  assert results_render.bold_best([0.5, 0.7, None]) == ["50.0", "**70.0**", "—"]


def test_sweep_report_rows_table_and_heatmap(tmp_path):
  """The sweep's summary report is built on the same rows as the scripts: one line per evaluated adapter,
  failed cells with their error, and a heatmap with one grid row per (task, method) when tasks differ."""

  def rec(task, mode, rank, acc, **extra):
    res = {"mode": mode, "task": task, "model": "tiny", "seed": 42, "steps": 6, "final_rank": rank, **extra}
    res["metrics"] = {"accuracy": acc, "ci95": [acc - 0.1, acc + 0.1], "gold_nll": 2.0 - acc, "gold_nll_sem": 0.01}
    return {"status": "ok", "seconds": 3.0, "result": res}

  records = {
      "a_direct": rec("arc_e", "direct", 4, 0.5),
      "b_direct": rec("siqa", "direct", 4, 0.25),
      "b_in": rec("siqa", "in_squeeze", 4, 0.75, ranks_per_stage=[8, 4], scheme="min_steps"),
      "boom": {"status": "failed", "seconds": 1.0, "error": "ValueError: bad rank"},
  }
  table = results_render.sweep_table(records, tmp_path)
  assert "| a_direct | direct | 4 | 6 | 50.0% (40.0–60.0) | 1.5000 ± 0.0100 | 3 |" in table
  assert "| b_in | in_squeeze_min_steps from r=8 | 4 | 6 | 75.0% (65.0–85.0) | 1.2500 ± 0.0100 | 3 |" in table
  assert "| boom | FAILED |" in table and "error: ValueError: bad rank" in table
  results_render.write_report({"name": "rep", "title": "t"}, tmp_path, records)
  assert (tmp_path / "rep.md").read_text().startswith("# t\n\n| cell | method |")
  assert (tmp_path / "rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_pilot_report_pairs_the_ranks_and_flags_overfitting(tmp_path):
  """experiments/rank_pilot.py report on a hand-made store: the paired Δ NLL / Δ accuracy of r=32 vs r=1
  with their SEM, the train losses from the curves, and the overfitting sentence."""
  rng = np.random.default_rng(7)
  n = 400
  nll_lo = rng.uniform(2.0, 6.0, n)
  nll_hi = nll_lo + 0.5 + rng.normal(0.0, 0.3, n)
  correct_lo = (rng.random(n) < 0.4).astype(int)
  correct_hi = correct_lo.copy()
  store = tmp_path / "pilot"
  (store / "results").mkdir(parents=True)
  (store / "curves").mkdir()
  for rank, nll, correct, train in ((1, nll_lo, correct_lo, 2.5), (32, nll_hi, correct_hi, 1.5)):
    cell = f"siqa_s42_direct_r{rank}_lr0.1"
    metrics = {
        "accuracy": float(correct.mean()),
        "n": n,
        "gold_nll": float(nll.mean()),
        "per_example": {"gold_nll": nll.tolist(), "correct": correct.tolist()},
    }
    res = {"mode": "direct", "model": "gemma3_270m", "task": "siqa", "seed": 42, "steps": 120, "final_rank": rank}
    res |= {"learning_rate": 0.1, "metrics": metrics}
    (store / "results" / f"{cell}.json").write_text(json.dumps({"name": cell, "status": "ok", "result": res}))
    curve = [{"step": s, "rank": rank, "loss": train + (1.0 if s < 100 else 0.0)} for s in range(1, 121)]
    (store / "curves" / f"{cell}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
  pilot = _script("rank_pilot")
  assert pilot.main(["report", "--results", str(store), "--out", str(tmp_path)]) == 0
  md = (tmp_path / "rank_pilot.md").read_text()
  d = nll_hi - nll_lo
  sem = d.std(ddof=1) / math.sqrt(n)
  assert f"| siqa | {n} | 0.1 / 0.1 | 2.500 / 1.500 |" in md
  assert f"{d.mean():+.4f} ± {sem:.4f}" in md and "+0.0 ± 0.0" in md  # same correctness: Δ acc exactly 0
  assert "r=32 reaches a higher (worse) held-out NLL than r=1" in md and "it overfits the training part" in md
  assert (tmp_path / "rank_pilot_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_direct_lr_by_accuracy_or_nll():
  """The two rate rules on rows where they disagree: the paper's (accuracy) and the campaign's (held-out NLL),
  both averaged over the tasks, seeds first; a rate missing a task is no candidate."""

  def row(task, lr, seed, acc, nll, rank=4):
    return R.Row(
        store="s", cell=f"{task}_{lr}_{seed}", task=task, model="m", method="direct", rank=rank, source_rank=None,
        learning_rate=lr, seed=seed, steps=8, squeeze_method=None, accuracy=acc, ci95=None, n=10, gold_nll=nll,
    )  # fmt: skip

  rows = [
      row("a", 0.01, 42, 0.60, 1.00), row("a", 0.01, 43, 0.70, 1.10), row("b", 0.01, 42, 0.50, 0.90),
      row("a", 0.1, 42, 0.55, 0.80), row("b", 0.1, 42, 0.50, 0.85),
      row("a", 0.3, 42, 0.99, 0.10),  # no task b: never chosen
  ]  # fmt: skip
  # accuracy: 0.01 -> mean(0.65, 0.50) = 0.575 > 0.1 -> 0.525; NLL: 0.1 -> 0.825 < 0.01 -> mean(1.05, 0.9) = 0.975
  assert R.best_direct_lr(rows) == {4: 0.01}
  assert R.best_direct_lr(rows, by="nll") == {4: 0.1}
  with pytest.raises(ValueError, match="by='loss'"):
    R.best_direct_lr(rows, by="loss")
