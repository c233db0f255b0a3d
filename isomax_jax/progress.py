"""Console progress for people: a tqdm bar on a terminal, a plain line every few seconds otherwise.

Used by the evaluator (:mod:`isomax_jax.evaluation`) and the experiments. Only process 0 of a
multi-host run shows progress. Nothing here touches JAX: callers pass the numbers (fetched when
they are ready anyway), so progress never adds a host-device sync. tqdm is optional (the
``experiments`` extra installs it); without it, or off a terminal, plain lines are printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any


class Progress:
    """One progress bar (a training run, an evaluation pass).

    Args:
      desc: what is being done, e.g. ``"train isomax seed 0"``.
      total: number of units (steps, batches), or None when unknown (a stream).
      initial: units already done (a resumed run).
      unit: the unit's name.
      enabled: False shows nothing (e.g. processes other than 0).
      line_every_s: on a non-terminal, the interval between plain progress lines.
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        initial: int = 0,
        unit: str = "step",
        enabled: bool = True,
        line_every_s: float = 30.0,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.count = initial
        self._initial = initial
        self._enabled = enabled
        self._postfix: dict[str, Any] = {}
        self._start = time.time()
        self._last_line = self._start
        self._line_every_s = line_every_s
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines instead
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    leave=True,
                )  # fmt: skip

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by ``n`` units; ``postfix`` values (numbers or strings) are shown after it."""
        self.count += n
        if postfix:
            self._postfix.update(postfix)
        if not self._enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(_format(self._postfix), refresh=False)
            self._bar.update(n)
            return
        now = time.time()
        finished = self.total is not None and self.count >= self.total
        if now - self._last_line >= self._line_every_s or finished:
            self._last_line = now
            print(self._line(now), file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        extra = " ".join(f"{k}={v}" for k, v in _format(self._postfix).items())
        if self.total is None:
            return (
                f"{self.desc}: {self.count} {_plural(self.unit)}, {now - self._start:.0f} s "
                f"{extra}".rstrip()
            )
        done = self.count - self._initial
        rate = done / max(now - self._start, 1e-9)
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        return (
            f"{self.desc}: {self.count}/{self.total} {_plural(self.unit)}, "
            f"{now - self._start:.0f} s, ETA {eta:.0f} s {extra}".rstrip()
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def _format(values: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in values.items():
        if isinstance(value, float):
            out[key] = f"{value:.4g}"
        else:
            out[key] = str(value)
    return out
