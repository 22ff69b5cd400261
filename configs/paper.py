"""The paper's sweeps, one ``artefact`` at a time; the experiments/ scripts turn their results stores into the
figures and tables.

  python -m lora_squeeze.sweep --config=configs/paper.py:artefact=lr_grid --workdir=runs/lr_grid
  python -m lora_squeeze.sweep --config=configs/paper.py:artefact=heatmap,lr_from=runs/lr_grid --workdir=runs/heatmap
  bash launch/sweep.sh slurm configs/paper.py:artefact=table1,lr_from=runs/lr_grid runs/table1   # one job per cell

artefact (what it runs → which scripts read it):
  lr_grid  direct training at every (task, rank, learning rate of the grid, seed)
           → experiments/table2_lr_grid.py, table3_seeds.py (seeds=42+43+44), fig3_lr_transfer.py
  direct   direct training at every (task, rank) with that rank's own rate (``lr_from`` / ``lrs``), nothing
           else: "does rank matter here?" (experiments/rank_pilot.py)
  fig3     direct training at every rank with ONE rate (``lr``, tuned at r_src), and Post-Squeeze from r_src
           to every lower rank → experiments/fig3_lr_transfer.py (Fig. 3; Fig. 8 with VL tasks)
  heatmap  direct training at every rank with its own rate (``lr_from`` an lr_grid store, or ``lrs``), and
           Post-Squeeze from every source rank to every target rank ≤ it, with the efficient method (Alg. 2)
           AND the standard one (Alg. 1, RSVD of ΔW: ``rsvd``) → fig4_heatmap.py (Fig. 4/9), fig5_efficient_vs_standard.py (Fig. 5),
           fig6_retention.py (Fig. 6/7: V_r of every source → target)
  table1   per task: zero-shot; direct r_tgt for N and for N + M steps; direct r_src for N; Post-Squeeze
           r_src → r_tgt; Cont-Squeeze (+M) for each M; In-Squeeze standard and minimum-steps over N + M
           → table1_methods.py (Table 1; Table 7 with model=gemma3_1b; Table 8 with VL tasks)

Scale switches: paper scale by default (Gemma 3 4B from ``checkpoint``; batch 8, length 1024; 10k steps, 15k
on the larger training sets; ranks 1…128; the learning-rate grid; 1000 warmup steps; M = 200 and 700);
``runlocal``: CPU scale on the real Gemma 3 270M with the offline data (see ``CPU`` below; not the paper's
protocol); ``tiny``: the tiny random model on the synthetic lookup task (the experiments tests).

Learning rates: the paper tunes one rate per rank (Table 2; its values are not in our copy of the paper). A
heatmap/table1 sweep takes them from a finished lr_grid store (``lr_from=DIR``: the best task-averaged rate per
rank, the paper's rule) or from ``lrs=1:0.03+8:0.01+...``; a rank with neither uses ``lr``.
"""

from lora_squeeze import config_lib

ARTEFACTS = ("lr_grid", "direct", "fig3", "heatmap", "table1")

# The paper's text tasks (Table 4) in the registry's names.
TEXT_TASKS = (
    "anli_r2",
    "arc_c",
    "arc_e",
    "boolq",
    "drop",
    "goemotions",
    "hellaswag",
    "mmlu",
    "obqa",
    "paws",
    "piqa",
    "siqa",
    "winogrande",
)
# "10,000 steps on smaller datasets and 15,000 steps on larger datasets" (Sec. 4); the paper does not list
# which are larger: we read it as the training sets of 40k examples or more.
LARGER_TASKS = ("anli_r2", "drop", "goemotions", "hellaswag", "mmlu", "paws")

# CPU scale (``runlocal``): the real Gemma 3 270M on offline tasks whose examples fit length 64 (prompt cut
# from the left; every choice must fit whole: PIQA's solutions run to 228 tokens, so PIQA is not one of them),
# ranks 1…32, short runs. What experiments/results/cpu_270m/ was made with.
CPU = dict(
    tasks=("arc_e", "obqa", "siqa"),
    ranks=(1, 2, 4, 8, 16, 32),
    steps=32,
    extra=(16,),
    batch=4,
    max_len=64,
    max_target_tokens=16,
    eval_limit=100,
    warmup=8,
    change_warmup=4,
    min_steps=4,
    lr=0.1,
)


def _rank_lrs(arg) -> dict[int, float]:
  out = {}
  if arg.lr_from:
    from lora_squeeze import results  # pylint: disable=g-import-not-at-top

    out.update(results.best_direct_lr(results.load_rows([arg.lr_from])))
  for item in arg.lrs:
    rank, _, lr = str(item).partition(":")
    if not lr:
      raise ValueError(f"configs/paper.py: lrs item {item!r} is not RANK:RATE (e.g. lrs=1:0.03+8:0.01)")
    out[int(rank)] = float(lr)
  return out


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      artefact=("heatmap",),
      model="gemma3_4b",
      checkpoint="",
      tasks=TEXT_TASKS,
      ranks=config_lib.PAPER_RANKS,
      lr_grid=config_lib.LR_GRID,
      seeds=(42,),
      lr=0.01,
      lrs=(),
      lr_from="",
      src=128,
      tgt=1,
      sources=(),
      methods=("efficient", "rsvd"),
      schemes=("standard", "min_steps"),
      steps=0,
      extra=(200, 700),
      runlocal=False,
      tiny=False,
  )
  artefacts = tuple(arg.artefact)
  if not artefacts or any(a not in ARTEFACTS for a in artefacts):
    raise ValueError(
        f"configs/paper.py: artefact={'+'.join(artefacts)!r}: each must be one of {ARTEFACTS} "
        f"(several with '+': artefact=heatmap+table1 runs their union, shared cells once)"
    )
  c = config_lib.base_config()
  c.model = arg.model
  if arg.checkpoint:
    c.model_options.checkpoint = arg.checkpoint
  tasks, ranks, extra, steps_of = tuple(arg.tasks), tuple(arg.ranks), tuple(arg.extra), None
  lr_default = arg.lr
  src, tgt, seeds = arg.src, arg.tgt, tuple(arg.seeds)
  default = config_lib.parse_arg(None, tasks=TEXT_TASKS, ranks=config_lib.PAPER_RANKS, extra=(200, 700), src=128)
  if arg.runlocal:  # CPU scale; explicit arguments still win over these defaults
    config_lib.runlocal(c, steps=arg.steps or CPU["steps"])
    tasks = CPU["tasks"] if tasks == default.tasks else tasks
    ranks = CPU["ranks"] if ranks == default.ranks else ranks
    extra = CPU["extra"] if extra == default.extra else extra
    src = max(ranks) if src == default.src else src
    lr_default = CPU["lr"] if arg.lr == 0.01 else arg.lr
    c.steps = arg.steps or CPU["steps"]
    c.warmup_steps, c.rank_change_warmup, c.min_steps = CPU["warmup"], CPU["change_warmup"], CPU["min_steps"]
    c.data.update(batch_size=CPU["batch"], max_len=CPU["max_len"], max_target_tokens=CPU["max_target_tokens"])
    c.eval.update(limit=CPU["eval_limit"], batch_size=8)
    c.checkpoint_every = 1000
    c.tensorboard = False
  elif arg.tiny:  # the experiments tests: seconds per cell
    c.model = "tiny"
    tasks = ("synthetic",)
    ranks = (4, 2, 1) if ranks == default.ranks else ranks
    extra = (4,) if extra == default.extra else extra
    src = max(ranks) if src == default.src else src
    c.steps = arg.steps or 12
    c.warmup_steps, c.rank_change_warmup, c.min_steps = 2, 1, 2
    c.data.update(task="synthetic", source="synthetic", batch_size=4, max_len=16, max_target_tokens=4)
    c.eval.update(enabled=True, limit=32, batch_size=8)
    c.checkpoint_every = 1000
    c.tensorboard = False
    c.progress = False
    c.log_every = 4
  else:
    base = arg.steps or 10_000
    steps_of = {t: (15_000 if t in LARGER_TASKS and not arg.steps else base) for t in tasks}
    c.steps = base
  if not arg.tiny:
    c.data.source = c.data.source if arg.runlocal else "tfds"
  rank_lr = _rank_lrs(arg)
  sources = tuple(int(s) for s in arg.sources) or ranks

  def n_steps(task):
    return steps_of[task] if steps_of else c.steps

  def lr_of(rank):
    return rank_lr.get(int(rank), lr_default)

  cells = {}

  def add(name, **overrides):
    if name in cells and cells[name]["overrides"] != overrides:
      raise ValueError(f"configs/paper.py: cell {name!r} defined twice with different settings")
    cells[name] = {"name": name, "overrides": overrides}

  def direct(tag, r, lr, base):
    name = f"{tag}_direct_r{r}_lr{lr:g}"
    add(name, mode="direct", **{"lora.rank": r, "learning_rate": lr}, **base)
    return name

  for task in tasks:
    for seed in seeds:
      tag = f"{task}_s{seed}"
      base = {"data.task": task, "seed": seed, "steps": n_steps(task)}
      at = {"data.task": task, "seed": seed}
      if "lr_grid" in artefacts:
        for r in ranks:
          for lr in arg.lr_grid:
            direct(tag, r, lr, base)
      if "direct" in artefacts:
        for r in ranks:
          direct(tag, r, lr_of(r), base)
      if "fig3" in artefacts:
        for r in ranks:
          direct(tag, r, lr_default, base)
        add(
            f"{tag}_post_from{src}_lr{lr_default:g}",
            mode="post_squeeze",
            source_workdir="@" + direct(tag, src, lr_default, base),
            target_ranks=tuple(r for r in ranks if r < src),
            **at,
        )
      if "heatmap" in artefacts:
        for r in ranks:
          direct(tag, r, lr_of(r), base)
        for s in sources:
          for method in arg.methods:
            add(
                f"{tag}_post_from{s}_{method}",
                mode="post_squeeze",
                source_workdir="@" + direct(tag, s, lr_of(s), base),
                target_ranks=tuple(r for r in ranks if r <= s),
                **{"squeeze.method": method},
                **at,
            )
      if "table1" in artefacts:
        n = n_steps(task)
        add(f"{tag}_zero_shot", mode="zero_shot", **at)
        source = direct(tag, src, lr_of(src), base)
        direct(tag, tgt, lr_of(tgt), base)
        add(f"{tag}_post_{src}to{tgt}", mode="post_squeeze", source_workdir=f"@{source}", target_ranks=(tgt,), **at)
        lrs = {f"r{r}": lr_of(r) for r in ranks}
        for m in extra:
          add(
              f"{tag}_direct_r{tgt}_lr{lr_of(tgt):g}_n{n + m}",
              mode="direct",
              **{"lora.rank": tgt, "learning_rate": lr_of(tgt)},
              **dict(base, steps=n + m),
          )
          add(
              f"{tag}_cont_{src}to{tgt}_m{m}",
              mode="cont_squeeze",
              source_workdir=f"@{source}",
              source_rank=src,
              target_rank=tgt,
              extra_steps=m,
              lr_by_rank=lrs,
              **base,
          )
          for scheme in arg.schemes:
            add(
                f"{tag}_in_{scheme}_{src}to{tgt}_m{m}",
                mode="in_squeeze",
                source_rank=src,
                target_rank=tgt,
                scheme=scheme,
                extra_steps=m,
                lr_by_rank=lrs,
                **{"lora.rank": src},
                **base,
            )
  c.sweep = list(cells.values())
  name = "+".join(artefacts)
  c.report = {"name": f"paper_{name.replace('+', '_')}", "title": f"{name} on {c.model}: {len(cells)} cells"}
  return c
