"""Units of work done by workers: plain functions that take their dependencies as arguments.

Nothing here imports Celery; ``tasks/`` wraps these functions as tasks, and the coordinator
calls them in-process when no broker is configured.
"""
