"""TFDS builders of our own for the two tasks TFDS lacks: MMLU and Social IQa.

Importing this package registers `mmlu` and `social_iqa` with TFDS, so the
usual tooling prepares them (array_record is what `tfds.data_source` reads):

  tfds build mmlu --imports=lora_squeeze.data.builders --file_format=array_record
  tfds build social_iqa --imports=lora_squeeze.data.builders --file_format=array_record

or in Python: `import lora_squeeze.data.builders; tfds.builder("mmlu")
.download_and_prepare(file_format="array_record")`. Neither imports TensorFlow.
"""

from lora_squeeze.data.builders.mmlu import Mmlu
from lora_squeeze.data.builders.siqa import SocialIqa

__all__ = ['Mmlu', 'SocialIqa']
