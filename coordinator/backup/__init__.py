"""cloud-dump backup: the replication stream, parts, and the run that ties them."""
