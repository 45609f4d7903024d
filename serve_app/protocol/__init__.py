"""HTTP request and response shapes, and the error shape, in one place."""
