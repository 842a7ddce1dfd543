"""PLDR-LLM modelling code (installed as ``pldr_hf.modeling``; also shipped as remote code with saved models)."""

from .configuration_pldr import PldrConfig
from .modeling_pldr import (
    CACHE_FIELD,
    PldrCausalLMOutputWithPast,
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
