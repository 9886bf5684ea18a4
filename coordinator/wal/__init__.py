"""WAL archiving commands; push and fetch are independent of each other."""
