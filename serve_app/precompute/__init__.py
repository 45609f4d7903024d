"""Popular queries, precomputed: counted by the ingress, ranked by the Precompute job, computed
by the ingress at background priority, and answered from memory until their collection changes.
"""
