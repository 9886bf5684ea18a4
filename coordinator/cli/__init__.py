"""The edge: console script and fast paths, argument parsing, config file, exit codes."""
