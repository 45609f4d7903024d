"""The HTTP routes, one router per area; `serve_app/http/api.py` includes them all."""
