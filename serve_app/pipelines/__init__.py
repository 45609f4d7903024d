"""The pipeline deployments: Search, Rag, Documents and Classify, and the Retriever they share."""
