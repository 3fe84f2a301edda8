"""SSMLoRA as a Hugging Face peft tuner type.

`import peft_ssmlora` registers the method with peft (idempotently); then use peft as usual::

    from peft import get_peft_model
    from peft_ssmlora import SSMLoRAConfig
    model = get_peft_model(base_model, SSMLoRAConfig(r=8, lora_alpha=16, task_type="SEQ_CLS"))
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .chain import ChainContext, ChainLink
from .config import DEFAULT_TARGET_MODULES, SSMLoRAConfig, SSMLoRAPeftType
from .layer import Linear, SSMLoRALayer
from .model import SSMLoRAModel
from .step import ssmlora_step

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ChainContext",
    "ChainLink",
    "Linear",
    "SSMLoRAConfig",
    "SSMLoRALayer",
    "SSMLoRAModel",
    "SSMLoRAPeftType",
    "ssmlora_step",
]


def _register() -> None:
    # peft's `register_peft_method` only accepts members of its own `PeftType` enum, so write the three registries
    # directly; assigning the same objects again is harmless, which makes re-imports and reloads safe.
    peft_type = SSMLoRAPeftType.SSMLORA
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = SSMLoRAConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = SSMLoRAModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = SSMLoRAModel.prefix


_register()
