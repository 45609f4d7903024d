"""The ingress's side of the Precompute job: take its due work, compute it, report back.

The job (serve_app/precompute/job.py) only decides what to compute; each ingress replica
runs this loop, so the answers are computed through the ingress's own admission at
background priority, and the graph's one edge between them is the ingress's handle to the job.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from serve_app.http.replica import Replica
from serve_app.http.routers.retrieval import run_background
from serve_app.precompute.work import work_through

logger = logging.getLogger("ray.serve")

TAKE_WAIT_S = 10.0  # each long poll for work
RETRY_S = 5.0  # after the job could not be reached


async def compute_popular(replica: Replica) -> None:
    """For as long as the replica lives: take a pass's work, compute it, report how it went."""
    job = replica.handles.precompute
    compute = functools.partial(run_background, replica)
    while True:
        try:
            work = await job.take.remote(TAKE_WAIT_S)
        except Exception as exc:  # the job is restarting, or not deployed yet
            logger.warning("Precompute: no work taken: %s", type(exc).__name__)
            await asyncio.sleep(RETRY_S)
            continue
        if work is None:
            continue
        try:
            outcome = await work_through(work, compute, replica.popular.store)
        except Exception:  # the pass ends as failed, and the job goes on
            logger.exception("Precompute pass failed")
            outcome = {}
        try:
            await job.finish.remote(work.number, outcome)
        except Exception as exc:
            logger.warning("Precompute: pass not reported: %s", type(exc).__name__)
