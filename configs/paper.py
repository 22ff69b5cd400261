"""The paper's sweeps, one ``artefact`` at a time; the experiments/ scripts turn their results stores into the
figures and tables. The cells are built by ``lora_squeeze/paper_sweeps.py`` (pure, tested there); this file
only reads the arguments.

  python -m lora_squeeze.sweep --config=configs/paper.py:artefact=lr_grid --workdir=runs/lr_grid
  python -m lora_squeeze.sweep --config=configs/paper.py:artefact=heatmap,lr_from=runs/lr_grid --workdir=runs/heatmap
  bash launch/sweep.sh slurm configs/paper.py:artefact=table1,lr_from=runs/lr_grid runs/table1   # one job per cell

artefact: lr_grid, direct, fig3, heatmap, table1, table3 or auto_rank, several joined with ``+`` (shared cells run once). What
each runs and which experiments/ script reads its store: the list at the top of ``lora_squeeze/paper_sweeps.py``
(and the README's table).

Scale switches: paper scale by default (Gemma 3 4B from ``checkpoint``; batch 8, length 1024; 10k steps, 15k
on the larger training sets; ranks 1…128; the learning-rate grid; 1000 warmup steps; M = 200 and 700);
``runlocal``: CPU scale on the real Gemma 3 270M with the offline data (``paper_sweeps.CPU``; not the paper's
protocol); ``tiny``: the tiny random model on the synthetic lookup task (the experiments tests).

Learning rates: the paper tunes one rate per rank (Table 2; its values are not in our copy of the paper). A
heatmap/table1/direct sweep takes them from ``lrs=1:0.03+8:0.01+...``, else from a finished lr_grid store
(``lr_from=DIR``: the best task-averaged rate per rank, by the paper's rule, or with ``lr_rule=nll`` by the
lowest held-out NLL), else ``lr``. ``lr_from`` is read when
the sweep runs, not here: its cells are named ``..._lrbest`` and the sweep stops, before any cell runs, if DIR
has no finished direct run at one of their ranks (give that rank's rate with ``lrs``).
"""

from lora_squeeze import config_lib
from lora_squeeze import paper_sweeps

ARTEFACTS = paper_sweeps.ARTEFACTS
TEXT_TASKS = paper_sweeps.TEXT_TASKS


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
      lr_rule="accuracy",
      src=128,
      tgt=1,
      sources=(),
      methods=("efficient", "rsvd"),
      schemes=("standard", "min_steps"),
      optimizer_states=("fresh",),
      tau=0.9,
      auto_tgt=4,
      steps=0,
      extra=(200, 700),
      runlocal=False,
      tiny=False,
  )
  return paper_sweeps.sweep_config(
      arg.artefact,
      scale="runlocal" if arg.runlocal else "tiny" if arg.tiny else "paper",
      model=arg.model,
      checkpoint=arg.checkpoint,
      steps=arg.steps,
      tasks=arg.tasks,
      ranks=arg.ranks,
      lr=arg.lr,
      src=arg.src,
      extra=arg.extra,
      seeds=arg.seeds,
      lr_grid=arg.lr_grid,
      lrs=paper_sweeps.parse_lrs(arg.lrs),
      lr_from=arg.lr_from,
      lr_rule=arg.lr_rule,
      tgt=arg.tgt,
      sources=arg.sources,
      methods=arg.methods,
      schemes=arg.schemes,
      optimizer_states=arg.optimizer_states,
      tau=arg.tau,
      auto_tgt=arg.auto_tgt,
  )
