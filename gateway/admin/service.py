"""The admin plane behind ``/admin``: the model registry and every deployment change.

Synchronous on purpose (a Redis client of its own, file writes, onnxruntime loads): the routes
run it in a worker thread, never on the event loop. Failures are typed ``AdminError``s that
carry their HTTP status, so the routes stay one call each.

``AdminService`` is the one object the routes call; its operations live by responsibility in
``model_operations`` (the registry), ``deployment_operations`` (roles, schedule, promotion,
rollback) and ``enrichment_operations`` (the online feature store), on the shared state and
steps of ``service_core``.
"""

from __future__ import annotations

from gateway.admin.deployment_operations import DeploymentOperations
from gateway.admin.enrichment_operations import EnrichmentOperations
from gateway.admin.model_operations import ModelOperations


class AdminService(ModelOperations, DeploymentOperations, EnrichmentOperations):
    """Every admin operation on one object (made once by ``gateway.admin.routes.start_admin``
    with the constructor of ``AdminCore``)."""
