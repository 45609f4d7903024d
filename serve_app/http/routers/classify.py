"""The classification route: a label per input."""

from __future__ import annotations

from fastapi import APIRouter

from serve_app.http.replica import ReplicaDep
from serve_app.protocol import limits
from serve_app.protocol.classify import ClassifyRequest, ClassifyResponse

router = APIRouter()


@router.post("/v1/classify")
async def classify(request: ClassifyRequest, replica: ReplicaDep) -> ClassifyResponse:
    """A label per input: embedding similarity, and the generator where that is unsure."""
    limits.check_classify(request, replica.settings.inputs, replica.config.classify.max_labels)
    classifier = replica.handles.classifier
    async with replica.admission.admit("classify") as ticket:
        return await ticket.call(lambda: classifier.classify.remote(request), request)
