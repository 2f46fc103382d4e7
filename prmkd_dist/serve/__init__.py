"""Serving: export a trained student (``export_student``), load the artifact without any training code
(``ServingArtifact``), and recommend for many users from files (``recommend_file``).

Names are imported lazily (PEP 562): ``from prmkd_dist.serve import ServingArtifact`` must not pull in
the export side, which imports the models and TorchRec.
"""
from __future__ import annotations

_LAZY = {
    "ServingArtifact": "prmkd_dist.serve.artifact",
    "ArtifactError": "prmkd_dist.serve.artifact",
    "HistoryError": "prmkd_dist.serve.artifact",
    "export_student": "prmkd_dist.serve.export",
    "ExportError": "prmkd_dist.serve.export",
    "ExportCheckError": "prmkd_dist.serve.export",
    "recommend_file": "prmkd_dist.serve.recommend",
    "RecommendInputError": "prmkd_dist.serve.recommend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prmkd_dist.serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
