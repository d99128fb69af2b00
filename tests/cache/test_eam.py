import json
import logging

import numpy as np
import pytest

from cache.eam import EAMCollection, new_matrix, row_normalise


def mat(rows):
    return np.asarray(rows, dtype=np.float64)


def test_row_normalise_keeps_zero_rows():
    m = row_normalise(mat([[1, 3], [0, 0]]))
    assert m.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_insert_fills_then_replaces_most_similar():
    c = EAMCollection(2, 3, capacity=2)
    a = mat([[5, 0, 0], [0, 5, 0]])
    b = mat([[0, 0, 4], [4, 0, 0]])
    assert c.insert(a) == 0 and c.insert(b) == 1 and len(c) == 2
    near_b = mat([[0, 1, 9], [8, 0, 1]])
    assert c.insert(near_b) == 1          # replaces b (most similar), keeps a
    stored = c.matrices()
    assert np.allclose(stored[0], row_normalise(a))
    assert np.allclose(stored[1], row_normalise(near_b))
    assert c.insert(new_matrix(2, 3)) is None and len(c) == 2


def test_insert_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        EAMCollection(2, 3).insert(np.zeros((3, 2)))


def test_match_over_seen_layers_predicts_later_layers():
    c = EAMCollection(3, 2, capacity=4)
    c.insert(mat([[9, 1], [9, 1], [9, 1]]))
    c.insert(mat([[1, 9], [1, 9], [1, 9]]))
    partial = mat([[0, 3], [0, 0], [0, 0]])       # only layer 0 seen, chose expert 1
    p = c.match(partial, layers_seen=1, nearest=1)
    assert p is not None and p.shape == (3, 2)
    assert np.allclose(p[2], [0.1, 0.9])
    both = c.match(partial, layers_seen=1, nearest=2)   # summed then normalised per row
    assert np.allclose(both[2], [0.5, 0.5])
    assert EAMCollection(3, 2).match(partial, 1) is None
    assert c.match(new_matrix(3, 2), 1) is None


def test_save_load_round_trip(tmp_path):
    c = EAMCollection(2, 2, capacity=3)
    c.insert(mat([[1, 3], [2, 2]]))
    c.insert(mat([[4, 0], [0, 1]]))
    path = tmp_path / "sub" / "store.json"
    c.save(str(path))
    assert [p.name for p in path.parent.iterdir()] == ["store.json"]   # no temp file left
    d = EAMCollection.load(str(path), 2, 2, capacity=3)
    assert len(d) == 2 and np.allclose(d.matrices(), c.matrices(), atol=1e-6)


def test_a_new_store_is_private_and_a_resaved_one_keeps_its_mode(tmp_path):
    c = EAMCollection(2, 2, capacity=3)
    c.insert(mat([[1, 3], [2, 2]]))
    path = tmp_path / "store.json"
    c.save(str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    c.save(str(path))
    assert path.stat().st_mode & 0o777 == 0o644


def test_load_missing_gives_empty(tmp_path):
    assert len(EAMCollection.load(str(tmp_path / "none.json"), 2, 2)) == 0


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"format": "other"}),
    json.dumps({"format": "moe-eamc", "version": 1, "num_layers": 3, "num_experts": 2,
                "matrices": []}),
    json.dumps({"format": "moe-eamc", "version": 1, "num_layers": 2, "num_experts": 2,
                "matrices": [[[1, "x"], [1, 1]]]}),
    json.dumps({"format": "moe-eamc", "version": 1, "num_layers": 2, "num_experts": 2,
                "matrices": [[[1, 2, 3], [1, 1, 1]]]}),
])
def test_load_corrupt_or_mismatched_warns_and_is_empty(tmp_path, caplog, content):
    path = tmp_path / "store.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="cache.eam"):
        c = EAMCollection.load(str(path), 2, 2)
    assert len(c) == 0
    assert str(path) in caplog.text and "ignored" in caplog.text
