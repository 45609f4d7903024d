"""Requests that were being handled when a model replica died, so a request that kills
replicas is not sent to one after another.

An idempotent call whose replica dies is made once more (`Ticket.call`): replicas die under
load for reasons of their own (killed, out of memory, a node lost), and the retry hides that
from the client. But a request that itself crashes its replica (an input that aborts the model
process) would take the next replica down too, with every other request on it; and the client,
retrying, a third. From outside, the two look the same at the first death, so the decision is
made on repetition:

- Each request has a digest (its route and body). When an attempt dies, its digest is counted
  as implicated in a death, unless the attempt was already running when the last death counted
  for that digest: identical requests in flight on the same dying replica are one death, not
  many, so an outside kill never condemns a popular request.
- Implicated once: the call is made once more, as before. If it then succeeds, the digest is
  cleared: the death was not its doing.
- Implicated in two deaths (its retry died as well, or a later identical request died after
  the first was implicated): it is not called again, and the request, and any identical one
  for `ttl_s`, is refused at once with 422 `request_crashed_replica`.

The set is bounded (`max_size`, least recently used out first) and each digest expires after
`ttl_s`, so memory stays fixed and a refused request may be tried again later. It lives in
each ingress replica: a poison request is stopped after at most two deaths per ingress replica.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from pydantic import BaseModel

from serve_app.protocol.errors import APIError

# Deaths a digest may be implicated in before it is refused.
CONDEMNED_AT = 2


@dataclass
class Implication:
    deaths: int
    last_death: float  # when the last counted death happened, by the Suspects' clock


def digest(route: str, *parts: Any) -> str:
    """A stable digest of a request's route and content (pydantic models by their JSON)."""

    def plain(value: Any) -> Any:
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    body = json.dumps([route, *map(plain, parts)], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def crashed_replica(route: str) -> APIError:
    return APIError(
        422,
        f"This {route} request was being handled when model replicas died, more than once; "
        "it is not run again. Sending it unchanged will be refused for a while.",
        code="request_crashed_replica",
    )


class Suspects:
    """Digests of requests implicated in replica deaths, with the number of deaths."""

    def __init__(
        self,
        max_size: int = 4096,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.implicated: TTLCache[str, Implication] = TTLCache(max_size, ttl_s, timer=clock)

    def condemned(self, key: str) -> bool:
        """Whether a request with this digest must not be run."""
        found = self.implicated.get(key)
        return found is not None and found.deaths >= CONDEMNED_AT

    def died(self, key: str, started: float) -> bool:
        """An attempt started at `started` died with its replica; whether the digest is now
        condemned. An attempt already running at the last counted death adds nothing."""
        now = self.clock()
        found = self.implicated.get(key)
        if found is None:
            self.implicated[key] = Implication(1, now)
        elif started > found.last_death:
            self.implicated[key] = Implication(found.deaths + 1, now)
        return self.condemned(key)

    def cleared(self, key: str) -> None:
        """An attempt succeeded: the deaths it was implicated in were not its doing."""
        self.implicated.pop(key, None)

    def __len__(self) -> int:
        return len(self.implicated)
