"""cloud-dump restore: reading a stored backup into a data directory, recovery settings."""
