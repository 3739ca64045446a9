"""benchmarks/kd_by_range.py: the per-ring gap and seed mean by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kd_by_range.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("kd_by_range", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gap_and_mean_by_hand(script):
    assert script.gap(24.0, 14.0, 19.0) == pytest.approx(0.5)
    assert script.gap(24.0, 14.0, 12.0) == pytest.approx(-0.2)
    assert script.gap(14.0, 14.0, 15.0) is None and script.gap(None, 14.0, 15.0) is None
    assert script.mean([1.0, None, 3.0]) == 2.0 and script.mean([None]) is None


def test_variants_must_start_with_no_kd(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--work", str(tmp_path), "--variants", "mfd,no_kd"])
    assert "must start with no_kd" in capsys.readouterr().err
