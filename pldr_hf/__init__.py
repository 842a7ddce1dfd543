"""pldr-hf: PLDR-LLM as a first-class Hugging Face transformers model.

Importing this package registers the model type ``"pldrllm"`` with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
AutoModelForQuestionAnswering), and with the ``auto_map`` machinery used when a model is saved, so that a saved folder
also loads with ``trust_remote_code=True`` and plain transformers.
"""

import os as _os

# In a source checkout (not installed), the modelling code sits in <repo>/modeling rather than pldr_hf/modeling:
# let the import system find it there too, so that `import pldr_hf` from the repository root works.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "modeling")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "modeling", "modeling_pldr.py")
):
    __path__.append(_os.path.join(_here, _os.pardir))  # noqa: F821  (package __path__)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .modeling import (  # noqa: E402
    PldrCausalLMOutputWithPast,
    PldrConfig,
    PldrDeductiveOutputs,
    PldrDynamicCache,
    PldrForCausalLM,
    PldrForQuestionAnswering,
    PldrForSequenceClassification,
    PldrForTokenClassification,
    PldrModel,
    PldrModelOutputWithPast,
    PldrPreTrainedModel,
    PldrStaticCache,
    as_pldr_cache,
)

__version__ = "0.1.0"

AUTO_CLASSES = {
    AutoModel: PldrModel,
    AutoModelForCausalLM: PldrForCausalLM,
    AutoModelForSequenceClassification: PldrForSequenceClassification,
    AutoModelForTokenClassification: PldrForTokenClassification,
    AutoModelForQuestionAnswering: PldrForQuestionAnswering,
}


def _register():
    AutoConfig.register(PldrConfig.model_type, PldrConfig, exist_ok=True)
    for auto_cls, model_cls in AUTO_CLASSES.items():
        auto_cls.register(PldrConfig, model_cls, exist_ok=True)
    # save_pretrained then writes auto_map into config.json and copies modeling/ next to the weights (remote code).
    PldrConfig.register_for_auto_class()
    for auto_cls, model_cls in AUTO_CLASSES.items():
        model_cls.register_for_auto_class(auto_cls.__name__)


_register()

__all__ = [
    "PldrConfig",
    "PldrPreTrainedModel",
    "PldrModel",
    "PldrForCausalLM",
    "PldrForSequenceClassification",
    "PldrForTokenClassification",
    "PldrForQuestionAnswering",
    "PldrDynamicCache",
    "PldrStaticCache",
    "PldrDeductiveOutputs",
    "PldrModelOutputWithPast",
    "PldrCausalLMOutputWithPast",
    "as_pldr_cache",
    "__version__",
]
