"""The Celery boundary: the only coordinator code that speaks to the broker."""
