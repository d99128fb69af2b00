from engine.protocol import EngineStats
from server.metrics import Metrics


def test_cache_counters_render_from_typed_series():
    stats = EngineStats(cache={"hits": 3.0, "hit_rate": 0.75},
                        cache_layers={"hits": [1.0, 2.0], "stall_seconds": [0.5, 0.0]})
    text = Metrics().render(0, 0, stats, True)
    assert "moeserve_expert_cache_hits 3" in text
    assert 'moeserve_expert_cache_layer_hits{layer="0"} 1' in text
    assert 'moeserve_expert_cache_layer_hits{layer="1"} 2' in text
    assert 'moeserve_expert_cache_layer_stall_seconds{layer="0"} 0.5' in text
    assert "# TYPE moeserve_expert_cache_layer_hits gauge" in text
    assert text.count("# TYPE moeserve_expert_cache_layer_hits ") == 1
