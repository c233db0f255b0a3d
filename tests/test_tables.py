"""Tests of isomax_jax.tables (pure Python formatting; no compilation)."""

import numpy as np
import pytest

from isomax_jax.tables import (
    DEFAULT_METRICS,
    format_cell,
    format_results_table,
    mean_std,
    metric_label,
)


def _runs(rng, n):
    return [dict(zip(DEFAULT_METRICS, rng.random(5).tolist(), strict=True)) for _ in range(n)]


def _parse(table):
    lines = [line for line in table.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return rows[0], rows[2:]


def test_layout_and_values():
    rng = np.random.default_rng(0)
    results = {
        "SVHN": {"SoftMax+ES": _runs(rng, 5), "IsoMax+ES": _runs(rng, 5)},
        "LSUN": {"IsoMax+ES": _runs(rng, 3), "SoftMax+ES": _runs(rng, 1)},
        "TinyImageNet": {"SoftMax+ES": _runs(rng, 2)},
    }
    header, rows = _parse(format_results_table(results))
    methods = ["SoftMax+ES", "IsoMax+ES"]
    assert header[0] == "OOD set"
    assert header[1:] == [f"{metric_label(m)} {meth}" for m in DEFAULT_METRICS for meth in methods]
    assert [r[0] for r in rows] == ["SVHN", "LSUN", "TinyImageNet"]
    for row, (ood, by_method) in zip(rows, results.items(), strict=True):
        cells = iter(row[1:])
        for metric in DEFAULT_METRICS:
            for meth in methods:
                cell = next(cells)
                if meth not in by_method:
                    assert cell == "–"
                    continue
                x = 100 * np.array([run[metric] for run in by_method[meth]])
                want = f"{x.mean():.2f}" if len(x) == 1 else f"{x.mean():.2f} ± {x.std():.2f}"
                assert cell == want, (ood, meth, metric)


def test_header_labels_and_caption():
    res = {"SVHN": {"A": {"fpr_at_tpr": 0.5}}}
    text = format_results_table(res, metrics=("fpr_at_tpr",), tpr=0.9, convention="openood")
    assert text.splitlines()[0] == "Metrics in %, openood convention; mean ± std over runs."
    assert "FPR@TPR90 A" in text and text.endswith("\n")
    assert metric_label("tnr_at_tpr") == "TNR@TPR95"


def test_mean_std_and_cell():
    mean, std = mean_std([0.1, 0.2, 0.3], ddof=1)
    np.testing.assert_allclose([mean, std], [20.0, 10.0], rtol=1e-12)
    assert format_cell([0.123456], decimals=3) == "12.346"
    assert format_cell([1.0, 1.0]) == "100.00 ± 0.00"
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_missing_metric_raises():
    with pytest.raises(KeyError, match="lack metric 'auroc'"):
        format_results_table({"SVHN": {"A": [{"tnr_at_tpr": 0.5}]}}, metrics=("auroc",))
