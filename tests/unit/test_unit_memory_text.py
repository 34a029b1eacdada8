"""The text that says why a worker was recycled for memory: it must read as what happened."""

from __future__ import annotations

import re

import pytest

from corral._health import over_max_memory

MIB = 2**20
LIMIT = 150 * MIB


def _numbers(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"RSS ([0-9.]+) MiB > max_memory ([0-9.]+) MiB", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("over", [1, 4096, 5 * 4096, 50_000, 52_428, 52_429, MIB, LIMIT])
def test_the_rss_reads_as_more_than_the_limit(over: int) -> None:
    # Seen in a test run: a worker a few pages over 150 MiB was reported as "RSS 150.0 MiB >
    # max_memory 150.0 MiB", a statement that reads as false.
    rss, limit = _numbers(over_max_memory(LIMIT + over, LIMIT))
    assert rss > limit
    assert rss * MIB > LIMIT  # what a reader parses back is over the limit too


def test_one_decimal_when_it_is_enough() -> None:
    assert over_max_memory(200 * MIB, LIMIT) == "RSS 200.0 MiB > max_memory 150.0 MiB"
    assert over_max_memory(LIMIT + 4096, LIMIT) == "RSS 150.004 MiB > max_memory 150.000 MiB"
