"""The one buffer for values passed between layers: in memory up to its budget, past it in files, nothing left."""

import numpy as np
import pytest
import torch

from qpass.core.spill import Spill


def test_values_stay_in_memory_within_the_budget_and_go_to_files_past_it(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    a, b = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    with Spill(budget=a.nbytes) as spill:
        spill.put("h", 0, a)
        assert spill.directory is None and spill.held == a.nbytes
        spill.put("h", 1, torch.from_numpy(b))  # over the budget: a file
        assert spill.directory is not None and len(list(tmp_path.glob("qpass-layerwise-*/*.npy"))) == 1
        assert spill.get("h", 0) is a and np.array_equal(spill.get("h", 1), b)
        assert spill.tensor("h", 1).tolist() == b.tolist()
        spill.tensor("h", 1).add_(1)  # a copy of the file's: the kept value is unchanged
        assert np.array_equal(spill.get("h", 1), b)


def test_a_replaced_value_keeps_its_place_and_the_budget_its_count(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    x = np.zeros(4, dtype=np.float32)
    with Spill(budget=x.nbytes) as spill:
        spill.put("h", 0, x)
        spill.put("h", 0, x + 1)  # in memory still: the old value's bytes were given back first
        assert spill.directory is None and spill.held == x.nbytes and spill.get("h", 0)[0] == 1
        spill.put("h", 1, x + 2)
        spill.put("h", 1, x + 3)  # a file still: a new one, the old one removed
        assert len(list(tmp_path.glob("qpass-layerwise-*/*.npy"))) == 1 and spill.get("h", 1)[0] == 3


def test_drop_gives_back_memory_and_removes_files_and_exit_removes_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    x = np.ones(8, dtype=np.float32)
    with pytest.raises(KeyboardInterrupt):
        with Spill(budget=x.nbytes) as spill:
            spill.put("a", 0, x)
            spill.put("b", 0, x)
            spill.drop("a")
            assert spill.held == 0 and "a" not in spill and spill.names() == ["b"]
            spill.drop("b")
            assert list(tmp_path.glob("qpass-layerwise-*/*.npy")) == []
            spill.put("c", 0, x)
            spill.put("c", 1, x)
            raise KeyboardInterrupt  # however the block ends, nothing is left
    assert list(tmp_path.iterdir()) == []
