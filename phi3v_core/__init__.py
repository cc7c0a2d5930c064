"""phi3v_core: native Phi-3.5-vision model, processor, data, fine-tuning methods and the training path.

Importing the package registers ``phi3_v`` with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so official
checkpoint folders load with ``from_pretrained(folder)`` and no ``trust_remote_code``.
"""

from phi3v_core.config import Phi3VConfig, get_config, phi3_vision_v1_config, phi35_vision_config, tiny_config
from phi3v_core.model import Phi3VForCausalLM, Phi3VModel

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "get_config",
    "phi35_vision_config",
    "phi3_vision_v1_config",
    "tiny_config",
]
__version__ = "0.1.0"
