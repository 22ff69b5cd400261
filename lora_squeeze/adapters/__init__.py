"""Hugging Face PEFT LoRA adapters without torch, and the ``lora-squeeze`` command.

One module per job; this package re-exports the public names, so ``from lora_squeeze import adapters;
adapters.squeeze_adapter(...)`` is the way to use it:

* ``safetensors_io``: the .safetensors reader and streaming writer (numpy + ml_dtypes, bfloat16 included).
* ``peft_config``: adapter_config.json (``PeftAdapterConfig``: per-module r, alpha, scale) and the config a
  squeeze writes (scale 1 in every module).
* ``peft_adapter``: a PEFT adapter directory opened for reading (``PeftAdapter``, its ``LoraModule`` s).
* ``squeezing``: ``SqueezeOptions`` (what to do, for every format), rank planning (``plan_squeeze``),
  ``squeeze_modules`` (the loop every file format shares) and ``squeeze_adapter``.
* ``inspection``: ``lora-squeeze inspect`` (spectra, retention, plots).
* ``gemma_peft``: Gemma 3 LoRAs (our tree, lora.py) <-> PEFT directories (``export_peft`` / ``import_peft``).
* ``atomic_output``: outputs written atomically, never over their input, without debris from killed runs.
* ``cli``: the command (``main``); ``python -m lora_squeeze.adapters`` runs it too.

Single-file formats live beside this package (``lora_files.py``: kohya / LyCORIS / diffusers;
``gguf_lora.py``: llama.cpp / ollama) and reuse its reader, writer, planning and squeeze loop. The command
imports jax, numpy and ml_dtypes only (and gguf for GGUF files): the training stack (flax, gemma,
tensorflow) is the ``[train]`` extra, imported by ``export_peft`` / ``import_peft`` alone.
"""

from lora_squeeze.adapters.atomic_output import HOST_ID, atomic_dir, check_out_dir, fault_point, pid_alive
from lora_squeeze.adapters.cli import main
from lora_squeeze.adapters.errors import AdapterError
from lora_squeeze.adapters.gemma_peft import HF_BASE_MODELS, HF_LAYOUTS, HF_PROJECTIONS
from lora_squeeze.adapters.gemma_peft import export_peft, hf_module_name, import_peft, lora_alpha_json, target_modules
from lora_squeeze.adapters.inspection import InspectReport, check_plot_path, inspect_adapter
from lora_squeeze.adapters.peft_adapter import LoraModule, PeftAdapter
from lora_squeeze.adapters.peft_config import CONFIG_NAME, PEFT_DEFAULTS, PEFT_PREFIX, TORCH_WEIGHTS_NAME
from lora_squeeze.adapters.peft_config import WEIGHTS_NAME, PeftAdapterConfig, get_pattern_key, output_config
from lora_squeeze.adapters.peft_config import pattern_keys
from lora_squeeze.adapters.safetensors_io import DTYPE_CODES, FLOAT_CODES, NP_DTYPES, OUT_CODES
from lora_squeeze.adapters.safetensors_io import SafetensorsReader, SafetensorsWriter, TensorInfo
from lora_squeeze.adapters.safetensors_io import cast_factor, safetensors_size, save_safetensors
from lora_squeeze.adapters.squeezing import DTYPES, DYNAMIC_RULES, METHODS, ModuleReport, SqueezeReport
from lora_squeeze.adapters.squeezing import adapter_spectra, check_target, fmt_bytes, plan_ranks
from lora_squeeze.adapters.squeezing import progress_bar, squeeze_adapter, squeeze_matrices, squeeze_modules
from lora_squeeze.adapters.squeezing import RankPlan, SqueezeOptions, plan_squeeze
