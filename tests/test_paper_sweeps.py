"""lora_squeeze/paper_sweeps.py: the cells of the paper's sweeps from plain arguments (no files, no model)."""

import collections
import hashlib
import importlib.util
import json
import pathlib

import pytest

from lora_squeeze import config_lib
from lora_squeeze import paper_sweeps as P
from lora_squeeze.workdir import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER_ARGS = dict(tasks=P.TEXT_TASKS, ranks=config_lib.PAPER_RANKS, steps=P.steps_per_task(P.TEXT_TASKS))


def _per_task(cells):
  return collections.Counter(c["overrides"]["data.task"] for c in cells)


@pytest.mark.parametrize(
    "artefact, per_task",
    [
        ("lr_grid", 8 * 5),  # every rank at every rate of the grid
        ("direct", 8),  # every rank at its own rate
        ("fig3", 8 + 1),  # every rank at one rate, Post-Squeeze from r_src = 128 (a cell already there)
        ("heatmap", 8 + 8 * 2),  # every rank, Post-Squeeze from each source with efficient and rsvd
        ("table1", 4 + 2 * 4),  # 0-S, direct r_src and r_tgt, Post; per M: direct N+M, Cont, In std, In min
        ("table3", 3 + 2 * 2),  # direct r_src and r_tgt, Post; per M: direct N+M, In min
        ("auto_rank", 2 + 2 * 4),  # direct r_src, Post to 4..1; per M: In auto to 4, uniform In to 4, 2, 1
    ],
)
def test_cell_counts_per_artefact_at_paper_scale(artefact, per_task):
  cells = P.cells((artefact,), **PAPER_ARGS)
  assert set(_per_task(cells).values()) == {per_task} and len(cells) == 13 * per_task
  assert len({c["name"] for c in cells}) == len(cells)


def test_steps_per_task_and_names():
  cells = {c["name"]: c["overrides"] for c in P.cells(("table1",), **PAPER_ARGS)}
  assert cells["mmlu_s42_direct_r1_lr0.01"]["steps"] == 15_000  # a larger training set
  assert cells["mmlu_s42_direct_r1_lr0.01_n15700"]["steps"] == 15_700
  assert cells["arc_e_s42_direct_r1_lr0.01"]["steps"] == 10_000
  assert cells["arc_e_s42_cont_128to1_m200"]["source_workdir"] == "@arc_e_s42_direct_r128_lr0.01"
  assert cells["arc_e_s42_in_min_steps_128to1_m700"]["lr_by_rank"] == {f"r{r}": 0.01 for r in config_lib.PAPER_RANKS}
  assert P.steps_per_task(("mmlu", "arc_e"), 500) == {"mmlu": 500, "arc_e": 500}


def test_table1_optimizer_states_and_ladder_rates():
  """optimizer_states=fresh+carry adds In-Squeeze cells that carry the moments; every rank of the halving
  ladder gets a rate even when ``ranks`` names only r_src and r_tgt (no stage falls back to the base rate)."""
  args = dict(tasks=("siqa",), ranks=(1, 32), steps=40, src=32, tgt=1, extra=(10,), lrs={1: 0.1, 32: 0.03}, lr=0.05)
  fresh = {c["name"]: c["overrides"] for c in P.cells(("table1",), **args)}
  both = {c["name"]: c["overrides"] for c in P.cells(("table1",), optimizer_states=("fresh", "carry"), **args)}
  carried = sorted(set(both) - set(fresh))
  assert carried == ["siqa_s42_in_min_steps_32to1_m10_optcarry", "siqa_s42_in_standard_32to1_m10_optcarry"]
  for name in carried:
    assert both[name]["squeeze.optimizer_state"] == "carry"
    assert {k: v for k, v in both[name].items() if k != "squeeze.optimizer_state"} == fresh[
        name.replace("_optcarry", "")
    ]
  assert "squeeze.optimizer_state" not in fresh["siqa_s42_in_standard_32to1_m10"]
  assert fresh["siqa_s42_in_standard_32to1_m10"]["lr_by_rank"] == {
      "r1": 0.1,
      "r32": 0.03,
      "r16": 0.05,
      "r8": 0.05,
      "r4": 0.05,
      "r2": 0.05,
  }
  # table3 at other seeds is table1's seed-study subset: the same cells under the same names.
  t3 = {c["name"]: c["overrides"] for c in P.cells(("table3",), **dict(args, seeds=(43,)))}
  t1 = {c["name"]: c["overrides"] for c in P.cells(("table1",), **dict(args, seeds=(43,)))}
  assert set(t3) < set(t1) and all(t1[n] == o for n, o in t3.items())
  assert {n.split("_", 2)[2] for n in t3} == {
      "direct_r32_lr0.03",
      "direct_r1_lr0.1",
      "post_32to1",
      "direct_r1_lr0.1_n50",
      "in_min_steps_32to1_m10",
  }
  with pytest.raises(UserError, match=r"optimizer_states='carried'.*did you mean 'carry'"):
    P.cells(("table1",), optimizer_states=("carried",), **args)
  from lora_squeeze import optim as optim_lib  # pylint: disable=g-import-not-at-top

  assert P.OPTIMIZER_STATES == optim_lib.OPTIMIZER_STATE_MODES


def test_auto_rank_cells_compare_with_uniform_budgets():
  args = dict(tasks=("siqa",), ranks=(1, 32), steps=40, src=32, tgt=1, extra=(10,), lrs={1: 0.1, 32: 0.1})
  cells = {c["name"]: c["overrides"] for c in P.cells(("auto_rank",), tau=0.85, auto_tgt=4, **args)}
  auto = cells["siqa_s42_in_standard_32to4_m10_auto0.85"]
  assert auto["auto_rank.tau"] == 0.85 and auto["target_rank"] == 4 and auto["mode"] == "in_squeeze"
  assert {n for n in cells if n.startswith("siqa_s42_in_standard_32to") and "auto" not in n} == {
      f"siqa_s42_in_standard_32to{r}_m10" for r in (4, 2, 1)
  }
  assert cells["siqa_s42_post_32to1-4"]["target_ranks"] == (4, 3, 2, 1)  # r_eq need not be a power of 2
  # Shared with table1 (same names, same overrides): direct r_src and the uniform 32 -> 1 In-Squeeze.
  table1 = {c["name"]: c["overrides"] for c in P.cells(("table1",), **args)}
  shared = set(cells) & set(table1)
  assert shared == {"siqa_s42_direct_r32_lr0.1", "siqa_s42_in_standard_32to1_m10"}
  assert all(cells[n] == table1[n] for n in shared)
  with pytest.raises(UserError, match=r"tau: 1.5 is not an energy share"):
    P.cells(("auto_rank",), tau=1.5, **args)


def test_union_dedups_shared_cells_and_keeps_order():
  args = dict(PAPER_ARGS, tasks=("arc_e",))
  heat, table = P.cells(("heatmap",), **args), P.cells(("table1",), **args)
  both = P.cells(("heatmap", "table1"), **args)
  assert len(both) == len(heat) + len(table) - 2  # direct r128 and r1 are in both
  assert both == P.union(heat, table) == P.cells(("table1", "heatmap"), **args)  # ARTEFACTS order either way
  assert P.union(heat, heat) == heat
  clash = [{"name": heat[0]["name"], "overrides": dict(heat[0]["overrides"], steps=1)}]
  with pytest.raises(UserError, match="defined twice with different settings"):
    P.union(heat, clash)


def test_rates_lrs_over_lr_from_over_lr():
  cells = P.cells(("direct",), tasks=("arc_e",), ranks=(1, 8, 32), steps=10, lr=0.5, lrs={8: 0.03})
  assert [c["name"] for c in cells] == [
      "arc_e_s42_direct_r1_lr0.5",
      "arc_e_s42_direct_r8_lr0.03",
      "arc_e_s42_direct_r32_lr0.5",
  ]
  assert [c["overrides"]["learning_rate"] for c in cells] == [0.5, 0.03, 0.5]
  # lr_from: nothing read here; the cells hold references that sweep.py resolves when it runs
  cells = P.cells(("direct",), tasks=("arc_e",), ranks=(1, 8), steps=10, lrs={8: 0.03}, lr_from="runs/grid")
  assert [c["name"] for c in cells] == ["arc_e_s42_direct_r1_lrbest", "arc_e_s42_direct_r8_lr0.03"]
  assert cells[0]["overrides"]["learning_rate"] == {"best_lr_from": "runs/grid", "rank": 1}
  table = {
      c["name"]: c["overrides"]
      for c in P.cells(("table1",), tasks=("arc_e",), ranks=(1, 4), src=4, steps=10, lr_from="g")
  }
  assert table["arc_e_s42_cont_4to1_m200"]["lr_by_rank"] == {
      **{f"r{r}": config_lib.best_lr_from("g", r) for r in (1, 4)},
      "r2": 0.01,  # a ladder rank outside ``ranks``: ``lr`` (the lr_from store was swept over ``ranks``)
  }
  assert table["arc_e_s42_cont_4to1_m200"]["source_workdir"] == "@arc_e_s42_direct_r4_lrbest"
  assert "arc_e_s42_direct_r1_lrbest_n210" in table


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: P.check_artefacts(("fig99",)), r"artefact='fig99' is not one of .* \(did you mean 'fig3'\?\)"),
        (lambda: P.check_artefacts(("hetmap",)), r"did you mean 'heatmap'"),
        (lambda: P.check_artefacts(()), "artefact is empty"),
        (lambda: P.parse_lrs(["0.1"]), "lrs item '0.1' is not RANK:RATE"),
        (
            lambda: P.cells(("heatmap",), tasks=("arc_e",), ranks=(1,), steps=1, methods=("eficient",)),
            r"methods='eficient'.*did you mean 'efficient'",
        ),
        (
            lambda: P.cells(("table1",), tasks=("arc_e",), ranks=(1,), steps=1, schemes=("min_step",)),
            r"schemes='min_step'.*did you mean 'min_steps'",
        ),
        (lambda: P.cells(("direct",), tasks=("arc_e",), ranks=(0,), steps=1), "ranks: 0 is not an integer >= 1"),
        (lambda: P.cells(("direct",), tasks=("arc_e",), ranks=(), steps=1), "ranks is empty"),
        (lambda: P.cells(("fig3",), tasks=("arc_e",), ranks=(1,), steps=1, lr=-1.0), "lr: -1.0 is not a learning rate"),
        (
            lambda: P.cells(("direct",), tasks=("arc_ee",), ranks=(1,), steps=1),
            r"tasks: 'arc_ee' is not a task \(did you mean 'arc_e'",
        ),
        (lambda: P.scale_args("runloacl"), r"scale='runloacl'.*did you mean 'runlocal'"),
    ],
)
def test_bad_arguments_name_the_key_and_the_nearest_value(call, message):
  with pytest.raises(UserError, match=message):
    call()


def test_a_config_error_is_one_line_without_the_class():
  """config_flags wraps a failing get_config in a traceback; the entry points print the error's own message."""
  text = (
      "Traceback (most recent call last):\n  File ...\nlora_squeeze.workdir.UserError: artefact='hetmap' is not one of"
  )
  assert config_lib.flag_error_message(ValueError(text), ["prog"], None) == "artefact='hetmap' is not one of"


def test_scales():
  paper = P.sweep_config(("heatmap",))
  assert paper.model == "gemma3_4b" and paper.data.source == "tfds" and paper.steps == 10_000
  assert len(paper.sweep) == 13 * 24 and paper.report["name"] == "paper_heatmap"
  local = P.sweep_config(("heatmap", "table1"), scale="runlocal")
  assert local.model == "gemma3_270m" and local.data.source == "olmo" and local.steps == P.CPU["steps"]
  assert set(_per_task(local.sweep)) == set(P.CPU["tasks"])
  assert {c["overrides"]["learning_rate"] for c in local.sweep if c["overrides"]["mode"] == "direct"} == {P.CPU["lr"]}
  assert "arc_e_s42_post_32to1" in {c["name"] for c in local.sweep}  # src: the largest CPU rank
  assert local.report["name"] == "paper_heatmap_table1"
  explicit = P.scale_args("runlocal", tasks=("siqa",), ranks=(1, 8), extra=(200, 700), src=128, lr=0.03)
  assert explicit == dict(tasks=("siqa",), ranks=(1, 8), extra=P.CPU["extra"], src=8, lr=0.03)
  tiny = P.sweep_config(("table1",), scale="tiny", steps=8)
  assert tiny.model == "tiny" and tiny.steps == 8 and set(_per_task(tiny.sweep)) == {"synthetic"}


# A cell's name and overrides are its identity in a results store (sweep.py): a change here reruns every
# finished cell of the stores made with them (experiments/results/cpu_270m, cpu_campaign). These digests are
# those of configs/paper.py's closures before the cells moved into paper_sweeps.py; change one only on purpose.
PINNED = {
    "lr_grid": ("2dcda7aa0b5f33d3", "bf2eb7da220a6361", "c331d9edce4da407"),
    "direct": ("4d5326f5ef6ae348", "b06c5a7cd0d0f957", "1763ec4f1ea64091"),
    "fig3": ("e77f430cc1fbc368", "911357931704582a", "eed167e5ea19ff06"),
    "heatmap": ("3675b14df6a8fa7d", "74e685354ab8cd95", "00d519aa0a628200"),
    "table1": ("98c4fad9df1cb082", "ef6d9869c4ac8e14", "7728095fffdba80a"),
    "heatmap+table1": ("50e2be08ac145c43", "066652578098e192", "a5fcf7aeaef077ac"),
}


@pytest.mark.parametrize("artefacts", sorted(PINNED))
def test_cells_are_pinned(artefacts):
  got = tuple(
      hashlib.sha256(
          json.dumps(P.sweep_config(artefacts.split("+"), scale=s).sweep, sort_keys=True).encode()
      ).hexdigest()[:16]
      for s in ("paper", "runlocal", "tiny")
  )
  assert got == PINNED[artefacts]


# The cells of the committed campaigns' configs (experiments/cpu_campaign.sh, experiments/cpu_270m.sh) through
# configs/paper.py, as the closures in configs/paper.py made them.
CAMPAIGN_CELLS = {
    "artefact=lr_grid,runlocal,tasks=siqa,ranks=1+32,lr_grid=0.003+0.01+0.03+0.1,steps=40": "d8af847510b69583",
    "artefact=direct,runlocal,tasks=siqa+arc_e+obqa+winogrande+boolq,ranks=1+32,lrs=1:0.1+32:0.1,steps=120": "78a898221593afad",
    "artefact=heatmap+table1,runlocal,tasks=obqa+siqa+arc_e,ranks=1+2+4+8+16+32,sources=16+32,"
    "schemes=standard+min_steps": "7706c362befff4d1",
    "runlocal,artefact=lr_grid,tasks=arc_e,ranks=4,lr_grid=0.1,seeds=43+44": "a3a3c6ccd79ec801",
}


def _paper_config(arg):
  spec = importlib.util.spec_from_file_location("paper_config", ROOT / "configs" / "paper.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg", sorted(CAMPAIGN_CELLS))
def test_campaign_cells_are_pinned(arg):
  text = json.dumps(_paper_config(arg).sweep, sort_keys=True, default=str)
  assert hashlib.sha256(text.encode()).hexdigest()[:16] == CAMPAIGN_CELLS[arg]


# experiments/cpu_campaign.sh's stages: (config, the flags it adds, the committed store). A new config key
# must not make the sweep rerun what has landed (the campaign resumes from these records on a new machine).
_COMMON = {
    "data.batch_size": 8,
    "data.max_len": 128,
    "data.pack": True,
    "data.max_target_tokens": 64,
    "checkpoint_every": 20,
    "progress": False,
}
_SIQA = "runlocal,tasks=siqa,steps=40"
_T1 = f"{_SIQA},ranks=1+32,src=32,tgt=1,extra=10,lrs=1:0.1+32:0.1"
# Per committed store: the configs whose cells land in it (cpu_campaign.sh's stages), with their flags.
COMMITTED = {
    "rates": [
        ("artefact=lr_grid,runlocal,tasks=siqa,ranks=1+32,lr_grid=0.003+0.01+0.03+0.1,steps=40", {"eval.limit": 300}),
        (f"artefact=lr_grid,{_SIQA},ranks=1+32,lr_grid=0.3", {"eval.limit": 300}),
        (f"artefact=lr_grid,{_SIQA},ranks=2+4+8+16,lr_grid=0.01+0.03+0.1", {"eval.limit": 300}),
        (f"artefact=fig3,{_SIQA},ranks=1+2+4+8+16+32,lr=0.1", {"eval.limit": 300}),
        (
            f"artefact=heatmap,{_SIQA},ranks=1+2+4+8+16+32,lrs=1:0.1+2:0.1+4:0.1+8:0.1+16:0.1+32:0.1",
            {"eval.limit": 300},
        ),
    ],
    "pilot": [
        (
            "artefact=direct,runlocal,tasks=siqa+arc_e+obqa+winogrande+boolq,ranks=1+32,lrs=1:0.1+32:0.1,steps=120",
            {"eval.limit": 0},
        )
    ],
    "table1": [
        (f"artefact=table1,{_T1},optimizer_states=fresh+carry", {"eval.limit": 0}),
        (f"artefact=table3,{_T1},seeds=43+44", {"eval.limit": 0}),
        (f"artefact=table1,{_T1},seeds=43+44,schemes=standard", {"eval.limit": 0}),  # cpu_campaign.sh seeds2
        (f"artefact=auto_rank,{_T1},tau=0.9,auto_tgt=4", {"eval.limit": 0}),
    ],
}


@pytest.mark.parametrize("stage", sorted(COMMITTED))
def test_committed_campaign_records_would_not_rerun(stage, tmp_path):
  from lora_squeeze import sweep  # pylint: disable=g-import-not-at-top
  from lora_squeeze import workdir  # pylint: disable=g-import-not-at-top

  cells = {}
  for arg, flags in COMMITTED[stage]:
    c = _paper_config(arg)
    for key, value in {**_COMMON, **flags}.items():
      node = c
      *path, leaf = key.split(".")
      for part in path:
        node = node[part]
      node[leaf] = value
    cells.update({cell["name"]: (c, cell) for cell in c.sweep})
  store = ROOT / "experiments" / "results" / "cpu_campaign" / stage / "results"
  records = {p.stem: json.loads(p.read_text()) for p in store.glob("*.json")}
  if stage != "table1":  # table1 lands during the campaign; the others are committed
    assert records, store
  for name, record in records.items():
    assert name in cells, f"{stage}: committed cell {name} is no longer in the sweep"
    c, cell = cells[name]
    # As sweep.run_cell compares them: @source paths written back as @cell (the store may lie elsewhere).
    settings = sweep.portable(workdir.result_settings(sweep.cell_config(c, cell, tmp_path)), cell)
    old = sweep.portable(record["settings"], cell)
    same = sweep.fingerprint(settings, record.get("sources", {})) == record["fingerprint"]
    assert same or not workdir.differences(old, settings), (name, workdir.differences(old, settings))
    for dep, dep_fp in record.get("sources", {}).items():  # a source rebuilt later makes its users rerun
      assert records.get(dep, {}).get("fingerprint") == dep_fp, f"{stage}: {name} read another run of {dep}"
