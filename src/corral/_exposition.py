"""/metrics bodies rendered by prometheus_client's own encoders, one family at a time, with the
families that did not change since the last scrape taken from a cache.

A scrape every second of a pool whose figures barely move re-renders the same lines again and
again (the text encoders cost a few microseconds a sample). The text formats are a
concatenation of independent families (OpenMetrics adds one ``# EOF`` at the end), so each
family is rendered alone by the encoder ``choose_encoder`` picks, and a family equal to last
time's (same samples, values included) reuses last time's bytes. The body is byte for byte what
the encoder would write for the whole registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.exposition import choose_encoder

__all__ = ["Renderer"]

_EOF = b"# EOF\n"


class _One:
    """A registry of one family, for the encoder."""

    __slots__ = ("metric",)

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    def collect(self) -> Iterable[Any]:
        return (self.metric,)


class Renderer:
    """Renders a registry for an Accept header; keeps the last scrape's families per format."""

    def __init__(self) -> None:
        # content type -> {family name: (family, its rendered bytes)}, last scrape only
        self._cache: dict[str, dict[str, tuple[Any, bytes]]] = {}

    def render(self, registry: Any, accept: str) -> tuple[bytes, str]:
        encoder: Callable[[Any], bytes]
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        old = self._cache.get(content_type, {})
        new: dict[str, tuple[Any, bytes]] = {}
        parts = []
        for metric in registry.collect():
            hit = old.get(metric.name)
            if hit is not None and hit[0] == metric:
                data = hit[1]
            else:
                data = encoder(_One(metric))
                if openmetrics and data.endswith(_EOF):
                    data = data[:-len(_EOF)]
            new[metric.name] = (metric, data)
            parts.append(data)
        if openmetrics:
            parts.append(_EOF)
        if len(self._cache) > 4:  # a few formats at most (text, OpenMetrics versions)
            self._cache.clear()
        self._cache[content_type] = new
        return b"".join(parts), content_type
