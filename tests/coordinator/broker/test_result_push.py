"""Answers pushed as workers store them (``Broker.watch_results``), with polling as the fallback.

A private ``redis-server``; results are stored by Celery's own Redis result backend, the code a
worker runs (SET and PUBLISH), so what is pushed is what a worker publishes. The flights' MGET
poll is slowed to an hour while every unanswered flight is covered by the push: an answer that
arrives then came by the push.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import flights as flights_module
from coordinator.broker.client import Broker, open_broker
from coordinator.broker.flights import Flight, Flights
from coordinator.wait import wait_until
from tasks.config import PARTS_QUEUE, make_app
from tests.coordinator.broker.test_broker_faults import OwnRedis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OwnRedis]:
    own = OwnRedis(tmp_path)
    yield own
    own.stop()


def _store(url: str, task_id: str, status: str, result: object) -> None:
    """Store a state as a worker does (Celery's Redis result backend: SET, then PUBLISH)."""
    backend = make_app(url).backend
    backend.store_result(task_id, result, status)


def _subscribed_flight(server: OwnRedis) -> tuple[Broker, Flights, Flight]:
    """Flights watching results, their subscription confirmed, and one flight sent after it."""
    broker = open_broker(server.url)
    flights = Flights(broker, grace_s=5, watch_results=True)
    watch = flights._watch
    assert watch is not None
    assert wait_until(lambda: watch.covers(time.monotonic()), timeout_s=30, first_s=0.001)
    flight = flights.start(Flight("cloud_dump.no_such_task", None, PARTS_QUEUE, "a unit"))
    return broker, flights, flight


def test_an_answer_stored_after_the_subscription_is_pushed(
    server: OwnRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flights_module, "PUSHED_REFRESH_EVERY_S", 3600.0)
    broker, flights, flight = _subscribed_flight(server)
    flights.refresh()  # the last MGET: from here on only the push can answer
    (task_id,) = flight.task_ids
    _store(server.url, task_id, "STARTED", {"hostname": "w1@host", "pid": 1})
    _store(server.url, task_id, "SUCCESS", "done")
    assert wait_until(lambda: flights.poll(flight), timeout_s=30, first_s=0.001)
    assert flight.result() == "done"
    flights.finish(flight)
    broker.close()


def test_an_answer_stored_before_the_subscription_is_polled(
    server: OwnRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flight published before the subscription was confirmed is not covered by it: the
    poll keeps its pace and finds the answer."""
    monkeypatch.setattr(flights_module, "PUSHED_REFRESH_EVERY_S", 3600.0)
    broker = open_broker(server.url)
    flights = Flights(broker, grace_s=5, watch_results=True)
    flight = flights.start(Flight("cloud_dump.no_such_task", None, PARTS_QUEUE, "a unit"))
    flight.publishing_at = 0.0  # as if published before any subscription
    (task_id,) = flight.task_ids
    flights._awaited.discard(task_id)  # and its pushes dropped: only the poll may answer
    _store(server.url, task_id, "SUCCESS", "polled")
    assert wait_until(lambda: flights.poll(flight), timeout_s=30, first_s=0.001)
    assert flight.result() == "polled"
    flights.finish(flight)
    broker.close()


def test_pushed_states_of_other_tasks_are_not_kept(server: OwnRedis) -> None:
    """Every worker's results reach the subscription; only the flights' own are kept."""
    broker, flights, flight = _subscribed_flight(server)
    _store(server.url, "someone-elses-task", "SUCCESS", "not ours")
    (task_id,) = flight.task_ids
    _store(server.url, task_id, "SUCCESS", "ours")
    assert wait_until(lambda: task_id in flights._pushed, timeout_s=30, first_s=0.001)
    assert set(flights._pushed) == {task_id}
    assert flights.poll(flight) and flight.result() == "ours"
    flights.finish(flight)
    assert not flights._pushed and not flights._awaited
    broker.close()
