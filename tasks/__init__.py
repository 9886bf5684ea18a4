"""The Celery side of cloud-dump: the app (``tasks.app``), its settings and thin task wrappers.

Start a worker with ``celery -A tasks.app worker -Q parts,wal`` and the ``CLOUD_DUMP_*``
environment (see ``tasks.settings``).
"""
