"""One Ray Serve deployment per model role, and the loading and batching they share."""
