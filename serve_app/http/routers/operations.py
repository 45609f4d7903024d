"""Operations: liveness, readiness, and the status of routes, models and deployments."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from ray import serve

from serve_app.cascade import decision
from serve_app.http.admission import Ticket, all_within
from serve_app.http.replica import Replica, ReplicaDep
from serve_app.protocol import errors

logger = logging.getLogger("ray.serve")

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the ingress answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": errors.ErrorResponse}})
async def ready(replica: ReplicaDep):
    """200 once every model has loaded and the document store answers `SELECT 1`, 503
    until then. Cheap, as probes call it often: no query touches the documents, and the
    calls are cancelled when it gives up."""
    models = replica.handles.models()
    calls = [handle.model_info.remote() for handle in models.values()]
    try:
        *answers, _ = await all_within(
            replica.config.ingress.ready_timeout_s, calls, select_one(replica)
        )
        infos = dict(zip(models, answers, strict=True))
    except Exception:
        return errors.error_response(
            errors.APIError(
                503,
                "Models or the document store are not ready yet.",
                "unavailable",
                code="not_ready",
            )
        )
    return {"status": "ready", "models": {role: i["model"] for role, i in infos.items()}}


async def select_one(replica: Replica) -> None:
    async with replica.store.connection() as conn:
        await conn.execute("SELECT 1")


@router.get("/v1/status")
async def status(request: Request, replica: ReplicaDep) -> dict[str, object]:
    """Routes with limits and load, host pressure, replicas per deployment, and models."""
    async with replica.admission.admit("manage") as ticket:
        schedule = ticket.track(replica.handles.precompute.report.remote())
        deployments, models, schedule = await ticket.wait(
            asyncio.gather(
                asyncio.to_thread(deployment_states), model_infos(replica, ticket), schedule
            )
        )
    return {
        **replica.admission.report(),
        "inputs": replica.settings.inputs.model_dump(),
        "auth": {"keys": len(request.app.state.api_keys.digests)},  # how many, never which
        "classify": decision(replica.config).status(),  # threshold in effect and its source
        "precompute": {**replica.popular.report(), "schedule": schedule},
        "deployments": deployments,
        "models": models,
    }


async def model_infos(replica: Replica, ticket: Ticket) -> dict[str, dict]:
    models = replica.handles.models()
    calls = [ticket.track(handle.model_info.remote()) for handle in models.values()]
    return dict(zip(models, await asyncio.gather(*calls), strict=True))


def deployment_states() -> dict[str, dict]:
    """Status and replicas by state of each deployment of this application (Serve's status).

    Serve's status call fails now and then inside a replica (Ray 2.60 cannot always unpickle
    the autoscaling policy it carries); the rest of the report still answers, with the
    deployments marked unavailable for this call."""
    app_name = serve.get_replica_context().app_name
    try:
        deployments = serve.status().applications[app_name].deployments
    except Exception as exc:
        logger.warning("/v1/status: Serve's status failed (%r)", exc)
        return {"unavailable": {"error": f"{type(exc).__name__}: {exc}"}}
    return {
        name: {
            "status": str(d.status.value),
            "replicas": {str(state): n for state, n in d.replica_states.items()},
        }
        for name, d in deployments.items()
    }
