"""/metrics bodies rendered by prometheus_client's own encoders, one family at a time, with the
families that did not change since the last scrape taken from a cache.

A scrape every second of a pool whose figures barely move re-renders the same lines again and
again (the text encoders cost a few microseconds a sample). The text formats are a
concatenation of independent families (OpenMetrics adds one ``# EOF`` at the end), so each
family is rendered alone by the encoder ``choose_encoder`` picks, and a family equal to last
time's (the same object: corral's collector hands out last scrape's family when its samples
did not change; or same samples, values included) reuses last time's bytes. The body is byte
for byte what the encoder would write for the whole registry.

A gauge or counter family that did change (a heartbeat age moves at every scrape) is written
by :func:`_simple`: a header (the encoder's, cached) and one ``name{labels} value`` line a
sample. It is used for a family only once it has written exactly what the encoder writes for
that family in that format (checked on the first render with samples); until then, and for
anything else (histograms, timestamps, exemplars, label values that need escaping), the
encoder writes it.

A pool at rest changes nothing but its ages between two scrapes. :meth:`Renderer.quick` then
skips the registry altogether: the caller (the endpoint, whose registry holds corral's collector
alone) tags each full render with what it was made of (:meth:`Renderer.stamp`: the pools'
published facts and counters), and a scrape with the same tag gets that render back with the
age families written anew by the same direct writing, so still byte for byte the encoder's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["Renderer"]

log = logging.getLogger(__name__)

_EOF = b"# EOF\n"
_float_text = cast(Callable[[float], str], floatToGoString)  # as the encoders write values


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
        self._encoders: dict[str, tuple[Callable[[Any], bytes], str]] = {}
        # (content type, family name) -> its header, once _simple() was seen to write what
        # the encoder writes for it; None: the encoder writes it (it did not match).
        self._simple: dict[tuple[str, str], bytes | None] = {}
        # content type -> (the key its last render was tagged with (see stamp()), that
        # render as quick() pieces once made)
        self._stamps: dict[str, tuple[Any, Any]] = {}
        # (sample name, label names, label values) -> the line up to its value (quick())
        self._lines: dict[tuple[str, tuple[str, ...], tuple[str, ...]], str] = {}

    def _choose(self, accept: str) -> tuple[Callable[[Any], bytes], str]:
        chosen = self._encoders.get(accept)
        if chosen is None:
            if len(self._encoders) > 16:  # a few distinct Accept headers in practice
                self._encoders.clear()
            try:
                chosen = choose_encoder(accept)
            except Exception as exc:
                # A malformed Accept (version=\xff made prometheus_client compare a str with
                # an int): the client gets the plain text format, as with no Accept at all.
                log.debug("metrics: Accept %r is malformed (%s: %s); serving plain text",
                          accept, type(exc).__name__, exc)
                chosen = choose_encoder("")
            self._encoders[accept] = chosen
        return chosen

    def stamp(self, content_type: str, key: Any) -> None:
        """Tag the last render in ``content_type`` with ``key`` (what the caller rendered it
        from): :meth:`quick` reuses it only for the same key."""
        self._stamps[content_type] = (key, None)

    def quick(self, accept: str, key: Any,
              rows: dict[str, tuple[tuple[str, ...], list[tuple[tuple[str, ...], float]]]]
              ) -> tuple[bytes, str] | None:
        """The last render for this Accept header with the families in ``rows`` (gauges or
        counters: ``name -> (label names, [(label values, value)])``) written anew, the other
        families as they were; None if that render was not tagged ``key`` (see :meth:`stamp`)
        or a family of ``rows`` is not one :func:`_simple` was seen to write exactly."""
        content_type = self._choose(accept)[1]
        tagged = self._stamps.get(content_type)
        if tagged is None or tagged[0] != key:
            return None
        template = tagged[1]
        if template is None or template[0] != rows.keys():
            template = self._template(content_type, rows)
            if template is None:
                return None
            self._stamps[content_type] = (key, template)
        parts = []
        for piece in template[1]:
            if isinstance(piece, bytes):
                parts.append(piece)
                continue
            name, sample, header = piece
            labels, samples = rows[name]
            lines = []
            for values, value in samples:
                head = self._line(sample, labels, values)
                if head is None:
                    return None
                lines.append(head + _float_text(value) + "\n")
            parts.append(header + "".join(lines).encode())
        return b"".join(parts), content_type

    def _template(self, content_type: str, rows: dict[str, Any]) -> tuple[Any, list[Any]] | None:
        """The last render as pieces: the bytes of the families not in ``rows`` (runs joined)
        and (name, sample name, header) for those in it; None if one cannot be written."""
        cache = self._cache.get(content_type)
        if cache is None or not all(name in cache for name in rows):
            return None
        pieces: list[Any] = []
        run: list[bytes] = []
        for name, (metric, data) in cache.items():
            if name not in rows:
                run.append(data)
                continue
            header = self._simple.get((content_type, name))
            if not header or metric.type not in ("gauge", "counter"):
                return None
            if run:
                pieces.append(b"".join(run))
                run = []
            pieces.append((name, name + "_total" if metric.type == "counter" else name, header))
        if content_type.startswith("application/openmetrics-text"):
            run.append(_EOF)
        if run:
            pieces.append(b"".join(run))
        return frozenset(rows), pieces

    def _line(self, sample: str, labels: tuple[str, ...], values: tuple[str, ...]
              ) -> str | None:
        """``name{label="value",...} `` as :func:`_simple` writes it (cached per series), or
        None if a label needs escaping (that one writes none of those either)."""
        key = (sample, labels, values)
        text = self._lines.get(key)
        if text is None:
            pairs = sorted(zip(labels, values, strict=True))
            if any(_escaped(k, v) for k, v in pairs):
                return None
            if len(self._lines) > 4096:  # bounded: series come and go with pools
                self._lines.clear()
            inner = ",".join(f'{k}="{v}"' for k, v in pairs)
            text = self._lines[key] = f"{sample}{{{inner}}} " if pairs else f"{sample} "
        return text

    def render(self, registry: Any, accept: str) -> tuple[bytes, str]:
        encoder, content_type = self._choose(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        old = self._cache.get(content_type, {})
        new: dict[str, tuple[Any, bytes]] = {}
        parts = []
        for metric in registry.collect():
            hit = old.get(metric.name)
            if hit is not None and (hit[0] is metric or hit[0] == metric):
                data = hit[1]
            else:
                data = self._family(metric, encoder, content_type, openmetrics)
            new[metric.name] = (metric, data)
            parts.append(data)
        if openmetrics:
            parts.append(_EOF)
        if len(self._cache) > 4:  # a few formats at most (text, OpenMetrics versions)
            self._cache.clear()
            self._simple.clear()
            self._stamps.clear()
        self._cache[content_type] = new
        self._stamps.pop(content_type, None)  # until the caller tags this render
        return b"".join(parts), content_type

    def _family(self, metric: Any, encoder: Callable[[Any], bytes], content_type: str,
                openmetrics: bool) -> bytes:
        key = (content_type, metric.name)
        header = self._simple.get(key, b"")
        if header:
            data = _simple(metric, header)
            if data is not None:
                return data
        data = _encode(metric, encoder, openmetrics)
        if header is not None and metric.samples and metric.type in ("gauge", "counter"):
            # Not decided yet: decide on this render.
            header = _encode(Metric(metric.name, metric.documentation, metric.type,
                                    metric.unit), encoder, openmetrics)
            mine = _simple(metric, header)
            if mine is not None:
                self._simple[key] = header if mine == data else None
        return data


def _encode(metric: Any, encoder: Callable[[Any], bytes], openmetrics: bool) -> bytes:
    data = encoder(_One(metric))
    return data[:-len(_EOF)] if openmetrics and data.endswith(_EOF) else data


def _simple(metric: Any, header: bytes) -> bytes | None:
    """A gauge or counter family written directly, or None if it has what this does not
    write (timestamps, exemplars, ``_created`` samples, label names or values to escape)."""
    lines = []
    names = (metric.name + "_total",) if metric.type == "counter" else (metric.name,)
    for s in metric.samples:
        if (s.timestamp is not None or s.exemplar is not None or s.name not in names
                or getattr(s, "native_histogram", None) is not None):
            return None
        labels = s.labels
        if labels:
            pairs = []
            for k, v in sorted(labels.items()):
                if _escaped(k, v):
                    return None
                pairs.append(f'{k}="{v}"')
            lines.append(f"{s.name}{{{','.join(pairs)}}} {_float_text(s.value)}\n")
        else:
            lines.append(f"{s.name} {_float_text(s.value)}\n")
    return header + "".join(lines).encode()


def _escaped(name: str, value: str) -> bool:
    """A label :func:`_simple` does not write (its value or name would need escaping)."""
    return "\\" in value or '"' in value or "\n" in value or not (name.isascii()
                                                                and name.isidentifier())
