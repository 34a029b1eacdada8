"""README's Kubernetes example: the YAML parses into a Pod whose probes point at the endpoint,
and the same paths answer as the kubelet expects on a real pool."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import obs_workers
import pytest
import yaml

import corral
from corral._observe import parse_address
from obs_support import get, scrape, value
from support import wait_for

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- k8s-example:"


def _example() -> tuple[dict[str, Any], str]:
    """The Pod (parsed) and the Python line before it that starts the supervisor."""
    text = README.read_text()
    at = text.index(MARK)
    block = re.search(r"```yaml\n(.*?)```", text[at:], re.S)
    assert block is not None, "no YAML block after the k8s-example marker"
    python = re.findall(r"```python\n(.*?)```", text[:at], re.S)[-1]
    return yaml.safe_load(block.group(1)), python


def test_the_yaml_is_a_pod_probing_the_endpoint() -> None:
    pod, python = _example()
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The program binds every interface on the port the probes use.
    http = re.search(r'http="([^"]+)"', python)
    assert http is not None, python
    host, port = parse_address(http.group(1))
    assert host == "0.0.0.0" and ports["corral"] == port
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe",
                                                   "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["port"] in ports
    # A liveness probe must wait longer than the endpoint's own ping timeout (1 s).
    assert container["livenessProbe"]["timeoutSeconds"] > 1
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.timeout(60)
def test_the_probed_paths_answer_on_a_real_pool(no_leaks: set[int]) -> None:
    pod, python = _example()
    (container,) = pod["spec"]["containers"]
    min_ready = int(re.search(r"min_ready=(\d+)", python).group(1))  # type: ignore[union-attr]
    workers = int(re.search(r"workers=(\d+)", python).group(1))  # type: ignore[union-attr]
    # Here on 127.0.0.1 and any free port: the same endpoint the pod binds on 0.0.0.0:9100.
    sup = corral.Supervisor(obs_workers.slow_both_ways, workers=workers,
                            args=lambda i: (1.0,), ready_when="ready", start_method="fork",
                            http="127.0.0.1:0", min_ready=min_ready, stop_timeout=5.0)
    sup.subscribe(lambda e: no_leaks.add(e.pid) if e.pid else None)
    with sup:
        addr = sup.http_address
        assert addr is not None
        startup = container["startupProbe"]["httpGet"]["path"]
        # Booting (each worker takes 1 s to be ready): alive, not ready yet.
        assert get(addr, container["livenessProbe"]["httpGet"]["path"]).status == 200
        assert get(addr, startup).status == 503
        wait_for(lambda: get(addr, startup).status == 200, 30, "the startup probe to pass")
        for probe in ("livenessProbe", "readinessProbe"):
            r = get(addr, container[probe]["httpGet"]["path"])
            assert r.status == 200, (probe, r.text)
        path = pod["metadata"]["annotations"]["prometheus.io/path"]
        assert path == "/metrics"
        assert value(scrape(addr), "corral_ready", pool="slow_both_ways") == 1
