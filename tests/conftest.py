"""Test session wiring: the real-server fixtures live in ``tests/rig`` and are registered here."""

pytest_plugins = [
    "tests.rig.moto",
    "tests.rig.postgres",
    "tests.rig.services",
]
