"""The coordinator's copies of unconfirmed payloads: in temporary files, read back unchanged."""

from __future__ import annotations

import os

from coordinator.broker.flights import KEEP_IN_FILE_BYTES, Flight, KeptPayload, _keep


def test_a_kept_payload_reads_back_the_same_bytes_every_time() -> None:
    data = os.urandom(3 * KEEP_IN_FILE_BYTES + 17)
    kept = KeptPayload(data)
    try:
        assert kept.read() == data
        assert kept.read() == data  # staged again a second time: from the start again
        assert kept.size == len(data)
    finally:
        kept.close()


def test_large_payloads_move_to_files_and_small_ones_stay_in_memory() -> None:
    large, small = os.urandom(KEEP_IN_FILE_BYTES), b"manifest"
    flight = Flight("cloud_dump.upload_part", None, "parts", "part 1",
                    payloads={"big": large, "small": small})  # fmt: skip
    _keep(flight)
    big = flight.payloads["big"]
    assert isinstance(big, KeptPayload)
    assert big.read() == large
    assert flight.payloads["small"] == small
    big.close()
