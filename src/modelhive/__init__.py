"""modelhive: several LLMs in one process, one OpenAI-compatible endpoint, one shared KV pool."""

from modelhive.config import ModelSpec
from modelhive.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["Hive", "ModelSpec", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Hive pulls in torch and the engine; import it lazily so `modelhive --help` stays fast.
    if name == "Hive":
        from modelhive.engine.hive import Hive

        return Hive
    raise AttributeError(name)
