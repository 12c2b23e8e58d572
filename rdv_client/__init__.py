"""A typed client of the gateway, sync (``Client``) and async (``AsyncClient``), on httpx alone.

    from rdv_client import Client
    with Client("http://127.0.0.1:8000") as rdv:
        answer = rdv.predict("breast-cancer", features={"mean radius": 14.1, ...})
        print(answer.label, answer.model.role)

Importing it needs nothing but httpx: it does not import the gateway.
"""

from rdv_client.client import AsyncClient, Client
from rdv_client.types import (
    GatewayUnreachable,
    Job,
    JobExists,
    ModelAnswer,
    Prediction,
    RdvError,
    Row,
)

__all__ = [
    "AsyncClient",
    "Client",
    "GatewayUnreachable",
    "Job",
    "JobExists",
    "ModelAnswer",
    "Prediction",
    "RdvError",
    "Row",
]
