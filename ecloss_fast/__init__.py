"""ECLoss (explainable channel loss) over the full activation-template set, fused.

    import ecloss_fast as ef
    loss = ef.ecloss(maps)               # maps: post-ReLU (B, C, H, W) of the last conv
    criterion = ef.ECLoss(estimator="marginal")

See docs/design.md for the definitions; ``available_backends()`` lists what runs here.
"""
from ecloss_fast import _ops  # noqa: F401  (registers the torch.library ops)
from ecloss_fast._dispatch import BackendUnavailableError, available_backends
from ecloss_fast._templates import make_templates, num_templates
from ecloss_fast._version import __version__
from ecloss_fast.beta import GradientRatioBeta, flush_subnormals
from ecloss_fast.calibration import calibrate_tau
from ecloss_fast.functional import ecloss
from ecloss_fast.module import ECLoss

__all__ = ["ecloss", "ECLoss", "calibrate_tau", "make_templates", "num_templates",
           "available_backends", "BackendUnavailableError", "GradientRatioBeta",
           "flush_subnormals", "__version__"]
