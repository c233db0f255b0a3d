"""isomax_jax: out-of-distribution detection with the IsoMax loss family in JAX/Flax."""

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

__version__ = "0.1.0"
