"""The HTTP layer: the FastAPI app, its routers, admission, the Guard and the Ingress deployment."""
