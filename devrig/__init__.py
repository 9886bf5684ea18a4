"""The development rig: real PostgreSQL, Redis, moto and Celery workers for tests, benchmarks
and the demo (pytest fixtures, registered by ``tests/conftest.py``). Not shipped."""
