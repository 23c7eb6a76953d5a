"""SOHO's model: backbone, visual embedding, visual dictionary, fusion encoder and heads.

Names are imported lazily, so ``soho_core.models.visual_dictionary`` (torch only) can be used
without paying for the transformers import that the fusion encoder needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SohoModel": "soho_core.models.soho",
    "VisualOutput": "soho_core.models.soho",
    "PretrainOutput": "soho_core.models.soho",
    "VisualDictionary": "soho_core.models.visual_dictionary",
    "DictionaryGate": "soho_core.models.visual_dictionary",
    "FusionEncoder": "soho_core.models.fusion",
    "Backbone": "soho_core.models.backbone",
    "VisualEmbedding": "soho_core.models.visual_embedding",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from soho_core.models.backbone import Backbone
    from soho_core.models.fusion import FusionEncoder
    from soho_core.models.soho import PretrainOutput, SohoModel, VisualOutput
    from soho_core.models.visual_dictionary import DictionaryGate, VisualDictionary
    from soho_core.models.visual_embedding import VisualEmbedding


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'soho_core.models' has no attribute {name!r} (exports: {', '.join(__all__)})")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
