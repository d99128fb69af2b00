"""/metrics renders the engine's typed cache data: totals, and per-layer series as one family
each with a layer label; counts are counters (_total), levels gauges."""
from engine.protocol import EngineStats
from server.metrics import Metrics


def test_cache_counters_render_from_typed_series() -> None:
    stats = EngineStats(cache={"hits": 3.0, "hit_rate": 0.75},
                        cache_layers={"hits": [1.0, 2.0], "stall_seconds": [0.5, 0.0]})
    text = Metrics().render(0, 0, stats, True)
    assert "moeserve_expert_cache_hits_total 3.0" in text
    assert "# TYPE moeserve_expert_cache_hit_rate gauge" in text and "moeserve_expert_cache_hit_rate 0.75" in text
    assert 'moeserve_expert_cache_layer_hits_total{layer="0"} 1.0' in text
    assert 'moeserve_expert_cache_layer_hits_total{layer="1"} 2.0' in text
    assert 'moeserve_expert_cache_layer_stall_seconds_total{layer="0"} 0.5' in text
    assert text.count("# TYPE moeserve_expert_cache_layer_hits_total counter") == 1
