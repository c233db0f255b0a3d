"""isomax_jax: out-of-distribution detection with the IsoMax loss family in JAX/Flax.

The core (logits, losses, heads, scores, metrics, detectors, thresholds) is imported with the
package. The heavier subpackages are attributes too, imported on first use, so that
``isomax_jax.nnx.IsoMaxHead`` or ``isomax_jax.models.get_model`` work after a plain
``import isomax_jax`` while that import pulls neither TensorFlow nor PyTorch (TensorFlow comes
only with :mod:`isomax_jax.data`, PyTorch only when a torch file is read).

Example:
  >>> import isomax_jax
  >>> isomax_jax.nnx.IsoMaxHead.__name__, isomax_jax.models.get_model.__name__
  ('IsoMaxHead', 'get_model')
"""

import importlib as _importlib

from isomax_jax import detectors as detectors
from isomax_jax import metrics as metrics
from isomax_jax import scores as scores
from isomax_jax import tables as tables
from isomax_jax import thresholds as thresholds
from isomax_jax.calibration import calibrate_temperature as calibrate_temperature
from isomax_jax.calibration import expected_calibration_error as expected_calibration_error
from isomax_jax.distances import dismax_logits as dismax_logits
from isomax_jax.distances import isomax_logits as isomax_logits
from isomax_jax.distances import isomax_plus_logits as isomax_plus_logits
from isomax_jax.distances import l2_normalize as l2_normalize
from isomax_jax.distances import pairwise_distance as pairwise_distance
from isomax_jax.heads import DisMaxHead as DisMaxHead
from isomax_jax.heads import IsoMaxHead as IsoMaxHead
from isomax_jax.heads import IsoMaxPlusHead as IsoMaxPlusHead
from isomax_jax.heads import SoftMaxHead as SoftMaxHead
from isomax_jax.losses import dismax_fpr_augment as dismax_fpr_augment
from isomax_jax.losses import dismax_fpr_loss as dismax_fpr_loss
from isomax_jax.losses import fpr_mosaic as fpr_mosaic
from isomax_jax.losses import fpr_targets as fpr_targets
from isomax_jax.losses import isomax_loss as isomax_loss
from isomax_jax.metrics import ood_metrics as ood_metrics
from isomax_jax.scores import energy as energy
from isomax_jax.scores import entropic as entropic
from isomax_jax.scores import max_probability as max_probability
from isomax_jax.scores import min_distance as min_distance
from isomax_jax.scores import mmles as mmles
from isomax_jax.scores import mmls as mmls
from isomax_jax.tables import format_results_table as format_results_table
from isomax_jax.thresholds import OODDetector as OODDetector
from isomax_jax.thresholds import fit_threshold as fit_threshold
from isomax_jax.validation import validate_labels as validate_labels

__version__ = "0.2.0"

#: Subpackages and modules imported on first attribute access (``isomax_jax.nnx`` ...).
_LAZY = frozenset({
    "calibration", "checkpointing", "data", "distances", "distributed", "evaluation", "heads",
    "losses", "models", "nnx", "parallel", "registry", "torch_import", "train", "validation",
})  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
