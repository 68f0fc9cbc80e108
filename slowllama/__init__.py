"""slowllama: LoRA finetuning of Llama models far larger than the machine's memory, one block at a time."""
from .api import EngineOptions, load, prepare
from .errors import SlowLlamaError
from .model.config import ModelConfig
from .model.lora import LoraConfig

__all__ = ['load', 'prepare', 'EngineOptions', 'LoraConfig', 'ModelConfig', 'SlowLlamaError']
__version__ = '0.1.0'
