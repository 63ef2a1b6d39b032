"""lostlm: pre-train LLaMA-style language models with LOST (low-rank and sparse) layers.

Importing the package registers the ``lost_llama`` model type with transformers'
``AutoConfig`` / ``AutoModelForCausalLM``, so a folder written by ``lostlm export`` loads with
``AutoModelForCausalLM.from_pretrained(path)``.
"""

from . import methods  # noqa: F401  (the built-in layer.method values, before any config is validated)
from .interop import lost_llama  # noqa: F401  (registration with the transformers Auto classes)

__version__ = "0.1.0"
