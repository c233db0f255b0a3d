"""Results tables in the IsoMax papers' layout, as Markdown, and the one Markdown table writer.

Rows are OOD sets; columns are, for each metric, one column per method (a loss/score pair such
as ``"SoftMax+ES"`` or ``"IsoMax+ES"``). Cells are percentages with two decimals, ``mean ± std``
over runs (population std, ``ddof=0`` as NumPy's default) or just the value for a single run.

The input is what :func:`isomax_jax.metrics.ood_metrics` returns, collected per OOD set, method
and run::

    results = {
        "SVHN": {"SoftMax+ES": [run0_metrics, run1_metrics], "IsoMax+ES": [...]},
        "LSUN": {...},
    }

where each ``run*_metrics`` is a mapping from metric name to a fraction in [0, 1] (floats or
scalar arrays). A single mapping instead of a list counts as one run.

:func:`markdown_table` writes any table (the experiment report's tables use it with
:func:`format_cell`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from isomax_jax import registry

DEFAULT_METRICS = tuple(m for m in registry.METRIC_NAMES if m != "fpr_at_tpr")


def metric_label(name: str, *, tpr: float = 0.95) -> str:
    """Column label of a metric name (:data:`isomax_jax.registry.METRICS`), e.g.
    ``"tnr_at_tpr"`` -> ``"TNR@TPR95"``; unknown names are returned as they are."""
    spec = registry.METRICS.get(name)
    return name if spec is None else spec.label(tpr)


def mean_std(values: Sequence[float], *, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of fractions, both ×100 (percent)."""
    x = 100.0 * np.asarray([float(v) for v in values], np.float64)
    if x.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(x, ddof=ddof)) if x.size > ddof else float("nan")
    return float(np.mean(x)), std


def format_cell(values: Sequence[float], *, decimals: int = 2, ddof: int = 0) -> str:
    """``"mean ± std"`` in percent (``"mean"`` alone for one run).

    Example:
      >>> format_cell([0.9512, 0.9488])
      '95.00 ± 0.12'
      >>> format_cell([0.5])
      '50.00'
    """
    mean, std = mean_std(values, ddof=ddof)
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header row, the separator, one line per row (no final newline).

    Example:
      >>> print(markdown_table(["OOD set", "AUROC"], [["SVHN", "96.60"]]))
      | OOD set | AUROC |
      |---|---|
      | SVHN | 96.60 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_results_table(
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, float]] | Mapping[str, float]]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tpr: float = 0.95,
    convention: str | None = None,
    decimals: int = 2,
    ddof: int = 0,
) -> str:
    """Markdown table: rows = OOD sets, columns = metric × method, cells in percent.

    Args:
      results: ``results[ood_set][method]`` is a list of per-run metric mappings (or one
        mapping for a single run), e.g. the dicts returned by ``ood_metrics``.
      metrics: metric names to show, in order (default: TNR@TPR95, AUROC, AUPR-in, AUPR-out,
        detection accuracy).
      tpr: the TPR the metrics were computed at, for the column labels only.
      convention: if given, a caption line says which metric convention produced the numbers.
      decimals: digits after the decimal point.
      ddof: delta degrees of freedom of the std over runs.

    Returns:
      The Markdown text (ends with a newline). Methods appear in first-seen order; a missing
      (OOD set, method) pair is shown as ``–``.

    Example:
      >>> res = {"SVHN": {"SoftMax+ES": [{"tnr_at_tpr": 0.332, "auroc": 0.869},
      ...                                {"tnr_at_tpr": 0.342, "auroc": 0.871}],
      ...                 "IsoMax+ES": {"tnr_at_tpr": 0.77, "auroc": 0.966}}}
      >>> print(format_results_table(res, metrics=("tnr_at_tpr", "auroc")), end="")
      | OOD set | TNR@TPR95 SoftMax+ES | TNR@TPR95 IsoMax+ES | AUROC SoftMax+ES | AUROC IsoMax+ES |
      |---|---|---|---|---|
      | SVHN | 33.70 ± 0.50 | 77.00 | 87.00 ± 0.10 | 96.60 |
    """
    methods: list[str] = []
    for by_method in results.values():
        for method in by_method:
            if method not in methods:
                methods.append(method)
    header = ["OOD set"] + [
        f"{metric_label(m, tpr=tpr)} {meth}" for m in metrics for meth in methods
    ]
    rows = []
    for ood_set, by_method in results.items():
        row = [str(ood_set)]
        for metric in metrics:
            for method in methods:
                runs = by_method.get(method)
                if runs is None:
                    row.append("–")
                    continue
                if isinstance(runs, Mapping):
                    runs = [runs]
                missing = [i for i, run in enumerate(runs) if metric not in run]
                if missing:
                    raise KeyError(f"{ood_set}/{method}: runs {missing} lack metric {metric!r}")
                row.append(format_cell([run[metric] for run in runs], decimals=decimals, ddof=ddof))
        rows.append(row)
    caption = ""
    if convention is not None:
        caption = f"Metrics in %, {convention} convention; mean ± std over runs.\n\n"
    return caption + markdown_table(header, rows) + "\n"
