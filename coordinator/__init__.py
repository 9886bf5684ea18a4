"""The cloud-dump command line: coordinator of backups, restore, and WAL front ends."""
