"""Checkpointed RNG state (issue 13, item 8): plain JSON that restores every generator exactly,
and a pickle planted where a checkpoint is read is never loaded."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from components.errors import ConfigError
from components.train.checkpoints import load_rng_state, save_rng_state


def _draws() -> list[float]:
    """Numbers from every generator a training step may use, including the cached second
    Gaussian that Python's `random.gauss` and numpy's legacy `standard_normal` keep."""
    return [*torch.rand(4).tolist(), random.random(), random.gauss(0.0, 1.0), *np.random.rand(3).tolist(),
            float(np.random.standard_normal())]


def _advance() -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    random.gauss(0.0, 1.0)  # leaves gauss_next set
    np.random.standard_normal()  # leaves has_gauss = 1
    torch.rand(7)


def test_a_restored_rng_state_draws_exactly_the_same_numbers(tmp_path: Path) -> None:
    _advance()
    save_rng_state(tmp_path, rank=0)
    expected = _draws()
    _draws()  # move on, as the rest of a killed run would
    load_rng_state(tmp_path, rank=0)
    assert _draws() == expected
    stored = json.loads((tmp_path / "rng-rank0.json").read_text())
    assert stored["python"]["gauss_next"] is not None and stored["numpy"]["has_gauss"] == 1


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_rng_state_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    (tmp_path / "rng-rank0.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match=r"rng-rank0.json: cannot restore the RNG state of rank 0: only "
                                          r"rng-rank0.pt, a pickle this version does not load"):
        load_rng_state(tmp_path, rank=0)
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"rng-rank1.json: .*it is missing"):
        load_rng_state(tmp_path, rank=1)


def test_a_malformed_rng_state_is_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    save_rng_state(tmp_path, rank=0)
    path = tmp_path / "rng-rank0.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "numpy": {**good["numpy"], "pos": "x"}}))
    with pytest.raises(ConfigError, match=r"rng-rank0.json: not an RNG state: numpy.pos: "):
        load_rng_state(tmp_path, rank=0)
    path.write_text(json.dumps({**good, "numpy": {**good["numpy"], "keys": good["numpy"]["keys"][:10]}}))
    with pytest.raises(ConfigError, match=r"rng-rank0.json: not an RNG state: numpy.keys: "):
        load_rng_state(tmp_path, rank=0)
    path.write_text(json.dumps({**good, "torch": good["torch"][:-1]}))
    with pytest.raises(ConfigError, match=r"rng-rank0.json: not a usable RNG state"):
        load_rng_state(tmp_path, rank=0)
