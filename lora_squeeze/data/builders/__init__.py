"""TFDS builders of our own for the tasks TFDS lacks: MMLU, Social IQa and the ten VQA sets.

Importing this package registers `mmlu`, `social_iqa` and the vision-language
builders of `vqa.py` (`vqav2`, `okvqa`, `aokvqa`, `textvqa`, `vizwiz_vqa`,
`tallyqa`, `gqa`, `chartqa`, `scienceqa`, `ocrvqa`) with TFDS, so the usual
tooling prepares them (array_record is what `tfds.data_source` reads):

  tfds build mmlu --imports=lora_squeeze.data.builders --file_format=array_record
  tfds build social_iqa --imports=lora_squeeze.data.builders --file_format=array_record
  tfds build okvqa --imports=lora_squeeze.data.builders --file_format=array_record --manual_dir=RAW

or in Python: `import lora_squeeze.data.builders; tfds.builder("mmlu")
.download_and_prepare(file_format="array_record")`. None imports TensorFlow.
The vision-language ones read hand-downloaded raw files (`--manual_dir`; each
builder's MANUAL_DOWNLOAD_INSTRUCTIONS says which).
"""

from lora_squeeze.data.builders.mmlu import Mmlu
from lora_squeeze.data.builders.siqa import SocialIqa
from lora_squeeze.data.builders.vqa import Aokvqa
from lora_squeeze.data.builders.vqa import Chartqa
from lora_squeeze.data.builders.vqa import Gqa
from lora_squeeze.data.builders.vqa import Ocrvqa
from lora_squeeze.data.builders.vqa import Okvqa
from lora_squeeze.data.builders.vqa import Scienceqa
from lora_squeeze.data.builders.vqa import Tallyqa
from lora_squeeze.data.builders.vqa import Textvqa
from lora_squeeze.data.builders.vqa import Vqav2
from lora_squeeze.data.builders.vqa import VizwizVqa

VL_BUILDERS = (Vqav2, Okvqa, Aokvqa, Textvqa, VizwizVqa, Tallyqa, Gqa, Chartqa, Scienceqa, Ocrvqa)

__all__ = ['Mmlu', 'SocialIqa', 'VL_BUILDERS'] + [b.__name__ for b in VL_BUILDERS]
