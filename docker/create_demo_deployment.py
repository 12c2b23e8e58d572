"""Create the demo deployment in Redis if it is missing: the compose file's one-shot step.

``rdv serve`` does this itself after training the demo models. In the multi-process layout
nothing else does: ``rdv train-demo`` only writes the models into the data folder, and
``rdv deployments create`` needs a running gateway with the admin API on. This runs after
``train`` and before the workers (which exit if their deployment does not exist), and does
nothing when the deployment is already there, so ``docker compose up`` can be run again.
"""

from __future__ import annotations

import logging
import sys

from gateway.cli.process import LOG_FORMAT
from gateway.settings import Settings
from models.demo import demo_deployment
from models.deployment_store import DeploymentStore
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT
from rendezvous.bus.connection import connect

log = logging.getLogger("rdv.create-demo-deployment")


def ensure_demo_deployment(settings: Settings) -> bool:
    """Create the demo deployment (real v2, canary v1, the default schedule from the
    ``RDV_`` settings) unless it exists. True when this call created it."""
    if not settings.redis_url:
        raise SystemExit("set RDV_REDIS_URL")
    client = connect(settings.redis_url)
    try:
        store = DeploymentStore(client)
        if DEMO_DEPLOYMENT in store.list():
            log.info("deployment %s exists; nothing to do", DEMO_DEPLOYMENT)
            return False
        created = store.create(
            demo_deployment(ModelRegistry(settings.models_dir), settings.schedule()),
            reason="docker compose: demo deployment",
        )
        log.info("created deployment %s (real v2, canary v1)", DEMO_DEPLOYMENT)
        return created
    finally:
        client.close()


def main() -> int:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    ensure_demo_deployment(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
