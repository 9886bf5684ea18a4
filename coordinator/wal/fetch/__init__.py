"""cloud-dump wal-fetch: the command, the detached prefetcher, the spool."""
