from __future__ import annotations

import threading

from actors.serving.ledger import Budget, Ledger, headroom_mb
from actors.serving.probes import DeviceReading


def test_headroom_is_the_tightest_of_measurement_claims_threshold_and_cap() -> None:
    reading = DeviceReading(total_mb=10_000, used_mb=1_000)
    # claims: 10000 - 2000 - 500 = 7500; measured: 9000 - 500 = 8500; threshold 90%: 9000 - 2000
    assert headroom_mb(reading, 2_000, Budget(500, 90, 0)) == 7_000
    assert headroom_mb(reading, 2_000, Budget(500, 100, 0)) == 7_500
    assert headroom_mb(reading, 2_000, Budget(500, 100, 4_000)) == 2_000
    # a device that reports memory late: measured use is ahead of the claims
    assert headroom_mb(DeviceReading(10_000, 9_000), 0, Budget(500, 100, 0)) == 500


def test_headroom_never_goes_negative() -> None:
    assert headroom_mb(DeviceReading(1_000, 1_000), 5_000, Budget(512, 90, 0)) == 0


def test_a_ledger_replaces_a_claim_and_releases_it() -> None:
    ledger = Ledger("sim0", "simulated", Budget(0, 100, 0), DeviceReading(1_000, 0))
    ledger.claim("m", 300)
    ledger.claim("m", 250)  # the measured size replaces the estimate
    assert ledger.info().claimed_mb == 250
    assert ledger.headroom_mb() == 750
    ledger.release("m")
    assert ledger.claims() == {}
    assert ledger.info().label == "sim0 (simulated)"


def test_a_ledger_keeps_its_sums_under_concurrent_claims() -> None:
    ledger = Ledger("cpu", "cpu", Budget(0, 100, 0), DeviceReading(100_000, 0))

    def claim_many(prefix: str) -> None:
        for i in range(500):
            ledger.claim(f"{prefix}{i}", 1)

    threads = [threading.Thread(target=claim_many, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.info().claimed_mb == 2_000
