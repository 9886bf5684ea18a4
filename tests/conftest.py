"""Test session wiring: the real-server fixtures live in ``tests/rig`` and are registered here.

A plugin is listed before the plugins that import it, so that pytest can rewrite its asserts.
"""

pytest_plugins = [
    "tests.rig.procs",
    "tests.rig.moto",
    "tests.rig.postgres",
    "tests.rig.sample",
    "tests.rig.services",
    "tests.rig.tcpproxy",
    "tests.rig.walarchive",
    "tests.rig.walfiles",
]
