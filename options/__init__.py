"""Every setting of cloud-dump, declared once (``options.declared``): flag, environment variable,
kind, default, range, which commands and whether workers read it, secret or not.

The CLI's parser, the wal-push/wal-fetch fast path, the range checks, the config file's
unknown-key warning, the workers' settings and the README's configuration table (held equal by a
test) all come from that one table. Standard library only, and cheap to import: the fast path
reads it on every ``archive_command`` call.
"""
