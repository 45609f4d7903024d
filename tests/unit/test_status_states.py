"""/v1/status's deployment states: Serve's status failing inside a replica fails no request."""

from __future__ import annotations

from types import SimpleNamespace

from serve_app.http.routers import operations


def test_a_failing_serve_status_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(
        operations.serve, "get_replica_context", lambda: SimpleNamespace(app_name="rag")
    )

    def broken():
        raise TypeError("ray.serve.autoscaling_policy is not registered for pickle by value")

    monkeypatch.setattr(operations.serve, "status", broken)
    states = operations.deployment_states()
    assert list(states) == ["unavailable"]
    assert "not registered" in states["unavailable"]["error"]


def test_states_list_each_deployment_and_its_replicas(monkeypatch):
    monkeypatch.setattr(
        operations.serve, "get_replica_context", lambda: SimpleNamespace(app_name="rag")
    )
    embedder = SimpleNamespace(
        status=SimpleNamespace(value="HEALTHY"), replica_states={"RUNNING": 2}
    )
    status = SimpleNamespace(
        applications={"rag": SimpleNamespace(deployments={"Embedder": embedder})}
    )
    monkeypatch.setattr(operations.serve, "status", lambda: status)
    assert operations.deployment_states() == {
        "Embedder": {"status": "HEALTHY", "replicas": {"RUNNING": 2}}
    }
