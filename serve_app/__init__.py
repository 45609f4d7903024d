"""The RAG serving application: configuration, HTTP shapes, ingress and the app builder."""
