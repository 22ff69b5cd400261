"""Vision-language runs (the paper's App. H: Fig. 8, Fig. 9, Table 8): Gemma 3 4B IT with its SigLIP tower,
LoRA on the text side only (vision tower and projector frozen), on the ten VQA tasks of
``lora_squeeze/data/vqa.py`` (prepare their TFDS builders first: ``tfds build okvqa
--imports=lora_squeeze.data.builders --file_format=array_record --manual_dir=RAW``).

One run, any mode of train.py (paper scale: batch 8, length 1024, N = 10k steps, Adafactor, 1000 warmup):
  python -m lora_squeeze.main --config=configs/vl.py:task=okvqa,rank=32,lr=0.003,checkpoint=/ckpts/gemma3-4b-it --workdir=runs/okvqa_r32
  python -m lora_squeeze.main --config=configs/vl.py:task=okvqa,mode=post_squeeze,source=runs/okvqa_r32,targets=16+8+4+2+1 --workdir=runs/okvqa_post32
  python -m lora_squeeze.main --config=configs/vl.py:task=tallyqa,mode=cont_squeeze,source=runs/tally_r128,src=128,tgt=1,extra=200 --workdir=...
  python -m lora_squeeze.main --config=configs/vl.py:task=tallyqa,mode=in_squeeze,src=128,tgt=1,scheme=min_steps --workdir=...
  python -m lora_squeeze.main --config=configs/vl.py:task=gqa,mode=zero_shot --workdir=...      # Table 8's "0-S"

The paper's VL artefacts as sweeps (``artefact=``; ``python -m lora_squeeze.sweep`` or ``launch/sweep.sh``):
configs/paper.py's fig3 / heatmap / table1 sweeps, with the VL tasks and the multimodal model.
  fig8    OK-VQA and TallyQA: direct at r = 1…32 with ONE rate (``lr``, tuned at r_src = 32: "higher ranks
          already saturate performance"), and Post-Squeeze 32 → each lower rank
  fig9    the ten tasks: direct at every rank 1…128 with its own rate (``lr_from`` an lr_grid store, or
          ``lrs=1:0.03+…``), Post-Squeeze every source → every target ≤ it
  table8  the ten tasks: 0-S; direct r_tgt = 1 for N and N + M; direct r_src = 128; Post-Squeeze 128 → 1;
          Cont-Squeeze +M; In-Squeeze standard and minimum-steps over N + M (M = 200 and 700)
  python -m lora_squeeze.sweep --config=configs/vl.py:artefact=table8,checkpoint=/ckpts/gemma3-4b-it,lr_from=runs/vl_lr --workdir=runs/vl_table8

``runlocal``: the tiny random multimodal model (``models.load("tiny", text_only=False)``: no Gemma 3 size
with a vision tower runs on a CPU) on a prepared VL builder in ``data_dir``, a few steps; what the tests run
end to end. Not a measurement of anything.
"""

import ml_collections

from lora_squeeze import config_lib
from lora_squeeze import paper_sweeps

# The ten VL tasks (registry names, lora_squeeze/data/vqa.py), in Table 8's order of our choice.
VL_TASKS = ("vqav2", "okvqa", "aokvqa", "textvqa", "vizwiz_vqa", "tallyqa", "gqa", "chartqa", "scienceqa", "ocrvqa")
FIG8_TASKS = ("okvqa", "tallyqa")
FIG8_RANKS = (1, 2, 4, 8, 16, 32)
MODES = ("direct", "post_squeeze", "cont_squeeze", "in_squeeze", "zero_shot")
# VL artefact -> the paper_sweeps artefact that builds its cells.
ARTEFACTS = {"fig8": "fig3", "fig9": "heatmap", "table8": "table1"}


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg,
      artefact="",
      mode="direct",
      task="okvqa",
      tasks=VL_TASKS,
      rank=32,
      lr=0.01,
      lrs=(),
      lr_from="",
      seed=42,
      steps=10_000,
      model="gemma3_4b",
      checkpoint="",
      data_dir="",
      source="",
      targets=(16, 8, 4, 2, 1),
      src=128,
      tgt=1,
      extra=200,
      scheme="standard",
      method="efficient",
      runlocal=False,
  )
  if arg.artefact:
    return _sweep(arg)
  if arg.mode not in MODES:
    raise ValueError(f"configs/vl.py: mode={arg.mode!r} is not one of {MODES}")
  c = config_lib.base_config()
  c.mode = arg.mode
  c.model = arg.model
  if arg.checkpoint:
    c.model_options.checkpoint = arg.checkpoint
  c.seed = arg.seed
  c.data.task = arg.task
  c.lora.rank = arg.rank
  c.learning_rate = arg.lr
  c.steps = arg.steps
  c.source_workdir = arg.source
  c.target_ranks = arg.targets
  c.source_rank, c.target_rank = arg.src, arg.tgt
  c.extra_steps = arg.extra
  c.scheme = arg.scheme
  c.squeeze.method = arg.method
  vl_settings(c, data_dir=arg.data_dir)
  if arg.runlocal:
    runlocal(c, steps=arg.steps)
  return c


def vl_settings(c: ml_collections.ConfigDict, *, data_dir: str = "") -> None:
  """What every VL run shares: the model WITH its vision tower, TFDS data, short answers."""
  c.model_options.text_only = False  # keep SigLIP + the projector (frozen; LoRA is on the text side only)
  c.data.source = "tfds"
  # VQA answers are a few tokens (OCR-VQA's titles and ChartQA's labels the longest).
  c.data.max_target_tokens = 32
  if data_dir:
    c.data.data_dir = data_dir


def runlocal(c: ml_collections.ConfigDict, *, steps: int) -> None:
  """CPU scale: the tiny random multimodal model, a few short steps, a handful of eval examples."""
  c.model = "tiny"
  c.model_options = ml_collections.ConfigDict({"text_only": False})
  c.steps = 6 if steps >= 10_000 else steps
  c.extra_steps = min(c.extra_steps, 4)
  c.warmup_steps, c.rank_change_warmup, c.min_steps = 2, 1, 2
  if c.mode == "in_squeeze":
    c.source_rank = min(c.source_rank, 8)
  c.lora.rank = min(c.lora.rank, 8)
  # The tiny tokenizer is byte-level: the prompt alone is ~100 tokens (+ the 8-token image block).
  c.data.update(batch_size=2, max_len=192, max_target_tokens=16)
  c.eval.update(limit=4, batch_size=2)
  c.checkpoint_every = 1000
  c.log_every = 2
  c.tensorboard = False
  c.progress = False


def _sweep(arg) -> ml_collections.ConfigDict:
  """fig8 / fig9 / table8: configs/paper.py's fig3 / heatmap / table1 cells (``paper_sweeps``) for the VL
  tasks, on the multimodal model."""
  if arg.artefact not in ARTEFACTS:
    raise ValueError(f"configs/vl.py: artefact={arg.artefact!r} is not one of {tuple(ARTEFACTS)}")
  tasks = tuple(arg.tasks)
  if arg.artefact == "fig8" and tasks == VL_TASKS:
    tasks = FIG8_TASKS
  ranks = FIG8_RANKS if arg.artefact == "fig8" else config_lib.PAPER_RANKS
  src, extra, steps = (32 if arg.artefact == "fig8" else arg.src), (200, 700), arg.steps
  if arg.runlocal:  # seconds per cell on the tiny multimodal model
    ranks, src, extra, steps = (1, 2, 4), 4, (2,), min(arg.steps, 6)
  c = paper_sweeps.sweep_config(
      (ARTEFACTS[arg.artefact],),
      model=arg.model,
      checkpoint=arg.checkpoint,
      steps=0 if steps == 10_000 else steps,
      tasks=tasks,
      ranks=ranks,
      lr=arg.lr,
      src=src,
      tgt=arg.tgt,
      extra=extra,
      seeds=(arg.seed,),
      lrs=paper_sweeps.parse_lrs(arg.lrs),
      lr_from=arg.lr_from,
  )
  vl_settings(c, data_dir=arg.data_dir)
  if arg.runlocal:
    runlocal(c, steps=steps)
  c.report = {"name": f"vl_{arg.artefact}", "title": f"{arg.artefact} (VL) on {c.model}: {len(c.sweep)} cells"}
  return c
