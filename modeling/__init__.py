"""PLDR-LLM modelling code (installed as ``pldr_hf.modeling``; also shipped as remote code with saved models)."""

from .cache_pldr import PldrDynamicCache, PldrStaticCache, as_pldr_cache
from .configuration_pldr import PldrConfig
from .modeling_pldr import (
    CACHE_FIELD,
    PldrCausalLMOutputWithPast,
    PldrDeductiveOutputs,
    PldrForCausalLM,
    PldrForQuestionAnswering,
    PldrForSequenceClassification,
    PldrForTokenClassification,
    PldrModel,
    PldrModelOutputWithPast,
    PldrPreTrainedModel,
)

__all__ = [
    "CACHE_FIELD",
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
]
