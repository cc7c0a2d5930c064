"""Native Phi-3(.5)-vision model (transformers Phi3Model + CLIPVisionModel), registered with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from phi3v_core.config import Phi3VConfig
from phi3v_core.model.image_embedding import Phi3ImageEmbedding, crop_grid_of, image_token_count
from phi3v_core.model.modeling import STOP_TOKEN_IDS, Phi3VForCausalLM, Phi3VModel, dead_parameter_names

__all__ = [
    "Phi3ImageEmbedding",
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VModel",
    "STOP_TOKEN_IDS",
    "crop_grid_of",
    "dead_parameter_names",
    "image_token_count",
]

AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
