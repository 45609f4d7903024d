"""Route deployments that own a pipeline (and, later, its limits): documents, search, rag."""
