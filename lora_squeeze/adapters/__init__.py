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
imports jax, numpy and ml_dtypes only (and gguf for single files): the training stack (flax, gemma,
tensorflow) is the ``[train]`` extra, imported by ``export_peft`` / ``import_peft`` alone.
"""

# pylint: disable=g-importing-member
# The command and errors.
from lora_squeeze.adapters.cli import main
from lora_squeeze.adapters.errors import AdapterError

# Squeeze and inspect (every format).
from lora_squeeze.adapters.squeezing import DTYPES, DYNAMIC_RULES, METHODS, SqueezeOptions, squeeze_adapter
from lora_squeeze.adapters.squeezing import ModuleReport, RankPlan, SqueezeReport, fmt_bytes
from lora_squeeze.adapters.squeezing import adapter_spectra, check_target, plan_ranks, plan_squeeze
from lora_squeeze.adapters.squeezing import factor_entries, squeeze_matrices, squeeze_modules, squeezed_factors
from lora_squeeze.adapters.inspection import InspectReport, inspect_adapter

# PEFT directories.
from lora_squeeze.adapters.peft_config import CONFIG_NAME, PEFT_PREFIX, TORCH_WEIGHTS_NAME, WEIGHTS_NAME
from lora_squeeze.adapters.peft_config import PeftAdapterConfig, get_pattern_key, new_config, output_config, pattern_keys
from lora_squeeze.adapters.peft_adapter import LoraModule, PeftAdapter

# Gemma 3 LoRAs <-> PEFT.
from lora_squeeze.adapters.gemma_peft import HF_BASE_MODELS, HF_LAYOUTS, HF_PROJECTIONS
from lora_squeeze.adapters.gemma_peft import export_peft, hf_module_name, import_peft, lora_alpha_json, target_modules

# Building blocks the single-file formats (lora_files.py, gguf_lora.py, gguf_convert.py) share.
from lora_squeeze.adapters.safetensors_io import DTYPE_CODES, FLOAT_CODES, NP_DTYPES, OUT_CODES
from lora_squeeze.adapters.safetensors_io import SafetensorsReader, SafetensorsWriter, TensorInfo
from lora_squeeze.adapters.safetensors_io import cast_factor, safetensors_size, save_safetensors
from lora_squeeze.adapters.atomic_output import atomic_dir, atomic_file, check_out_dir, check_out_file, fault_point
