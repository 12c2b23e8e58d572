"""Names of the demo: the breast-cancer model, its two versions and its deployment.

Kept apart from ``models.train`` so that what only needs the names (``rdv serve``'s
supervisor, the demo deployment) does not import scikit-learn: about 150 MB of memory held for
the life of the process.
"""

from __future__ import annotations

from models.registry import ModelRegistry

DEMO_MODEL = "breast-cancer"
DEMO_DEPLOYMENT = "breast-cancer"
CANARY_VERSION = 1
REAL_VERSION = 2


def demo_models_present(registry: ModelRegistry) -> bool:
    return all(registry.exists(DEMO_MODEL, v) for v in (CANARY_VERSION, REAL_VERSION))
