"""cloud-dump wal-push: the command, the detached pusher, one file's encoding, the spool."""
