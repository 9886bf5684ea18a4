"""Test session wiring: the real-server fixtures live in ``devrig`` and are registered here.

A plugin is listed before the plugins that import it, so that pytest can rewrite its asserts.
"""

pytest_plugins = [
    "devrig.procs",
    "devrig.moto",
    "devrig.postgres",
    "devrig.sample",
    "devrig.services",
    "devrig.tcpproxy",
    "devrig.tlsredis",
    "devrig.walarchive",
    "devrig.walfiles",
]
