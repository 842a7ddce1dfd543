"""pldr-hf: PLDR-LLM as a first-class Hugging Face transformers model.

Importing this package registers the model type ``"pldrllm"`` with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
AutoModelForQuestionAnswering), and with the ``auto_map`` machinery used when a model is saved, so that a saved folder
also loads with ``trust_remote_code=True`` and plain transformers.

The import itself is light (no torch, no transformers), so that ``pldr-hf --help`` answers at once: the model classes
are imported on first use (``pldr_hf.PldrForCausalLM``, ``from pldr_hf import PldrConfig``), and the registration
happens as soon as transformers is imported, before or after this package, whichever comes second.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import os as _os
import sys as _sys

# In a source checkout (not installed), the modelling code sits in <repo>/modeling rather than pldr_hf/modeling:
# let the import system find it there too, so that `import pldr_hf` from the repository root works.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "modeling")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "modeling", "modeling_pldr.py")
):
    __path__.append(_os.path.join(_here, _os.pardir))  # noqa: F821  (package __path__)

__version__ = "0.1.0"

_MODELING = __name__ + ".modeling"
_PUBLIC = (
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
)
_registered = False


def _modeling():
    return _sys.modules.get(_MODELING) or _importlib.import_module(_MODELING)


def _auto_classes() -> dict:
    """{transformers Auto class: PLDR class} for every head."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    m = _modeling()
    return {
        AutoModel: m.PldrModel,
        AutoModelForCausalLM: m.PldrForCausalLM,
        AutoModelForSequenceClassification: m.PldrForSequenceClassification,
        AutoModelForTokenClassification: m.PldrForTokenClassification,
        AutoModelForQuestionAnswering: m.PldrForQuestionAnswering,
    }


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig

    PldrConfig = _modeling().PldrConfig
    classes = _auto_classes()
    AutoConfig.register(PldrConfig.model_type, PldrConfig, exist_ok=True)
    for auto_cls, model_cls in classes.items():
        auto_cls.register(PldrConfig, model_cls, exist_ok=True)
    # save_pretrained then writes auto_map into config.json and copies modeling/ next to the weights (remote code).
    PldrConfig.register_for_auto_class()
    for auto_cls, model_cls in classes.items():
        model_cls.register_for_auto_class(auto_cls.__name__)
    if _finder in _sys.meta_path:
        _sys.meta_path.remove(_finder)


def _loaded(name: str) -> None:
    """Called when transformers or the modelling code has finished importing."""
    if name == _MODELING:
        _register()
    elif _MODELING not in _sys.modules:  # transformers is ready: import the model, which registers it
        _importlib.import_module(_MODELING)
    # else the modelling code is being imported (it imported transformers) and registers when it is done


class _RegisterOnImport(_importlib_abc.MetaPathFinder):
    """Registers the model once transformers (or the modelling code) has been imported: wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in ("transformers", _MODELING) or _registered:
            return None
        for finder in _sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader, fullname)
        return spec


class _ThenRegister(_importlib_abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _loaded(self._name)

    def __getattr__(self, attr):  # get_source, get_resource_reader, is_package ... of the real loader
        return getattr(self._loader, attr)


_finder = _RegisterOnImport()
if "transformers" in _sys.modules:
    _register()
else:
    _sys.meta_path.insert(0, _finder)


def __getattr__(name: str):
    if name in _PUBLIC or name == "modeling":
        module = _modeling()
        _register()
        return module if name == "modeling" else getattr(module, name)
    if name == "AUTO_CLASSES":
        _register()
        return _auto_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | {"AUTO_CLASSES"})


__all__ = [*_PUBLIC, "__version__"]
