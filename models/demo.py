"""Names of the demo: the breast-cancer model, its two versions and its deployment.

Kept apart from ``models.train`` so that what only needs the names (``rdv serve``'s
supervisor, the demo deployment) does not import scikit-learn: about 150 MB of memory held for
the life of the process.
"""

from __future__ import annotations

import time

from models.deployments import Deployment, ModelRef
from models.registry import ModelRegistry
from rendezvous import names
from rendezvous.schedule import Schedule

DEMO_MODEL = "breast-cancer"
DEMO_DEPLOYMENT = "breast-cancer"
CANARY_VERSION = 1
REAL_VERSION = 2


def demo_models_present(registry: ModelRegistry) -> bool:
    return all(registry.exists(DEMO_MODEL, v) for v in (CANARY_VERSION, REAL_VERSION))


def demo_deployment(registry: ModelRegistry, schedule: Schedule) -> Deployment:
    """The demo's deployment: version 2 real, version 1 the canary."""
    real = registry.meta(DEMO_MODEL, REAL_VERSION)
    return Deployment(
        name=DEMO_DEPLOYMENT,
        roles={
            names.REAL: ModelRef(DEMO_MODEL, REAL_VERSION),
            names.CANARY: ModelRef(DEMO_MODEL, CANARY_VERSION),
        },
        feature_spec=real.feature_spec,
        schedule=schedule,
        updated_ms=int(time.time() * 1000),
    )
