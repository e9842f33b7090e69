"""The cost model of docs/design.md section 6: flops, exponentials and bytes per estimator and pass.

Rows ``M = B*C``, templates ``N``, reduction length ``K = H*W``. One sweep of scores is a
GEMM of ``2*M*N*K`` flops plus ``M*N`` exponentials. These are the *useful* counts of the
loss: a route that does more work (the reference, the SDPA route's ``P V`` product and
``dK, dV``) is charged the same, so its TFLOP/s shows how far it is from the floor. Where
``M <= K`` the scores, no larger than the templates, can be kept from the forward (the
kept-scores route): 1 GEMM each way for either estimator, which every route is charged
there.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PASSES", "gemm_count", "sweep_count", "Workload"]

PASSES = ("forward", "backward", "forward_backward")

# (GEMMs of 2MNK, sweeps of M x N exponentials) per estimator and pass, docs/design.md
# section 6's table; with the scores kept, the exponentials of the row statistics and the
# column sums (forward), and of the prior's mean and dx's weights (backward).
_FORWARD = {"uniform": (1, 1), "marginal": (2, 2)}
_BACKWARD = {"uniform": (2, 1), "marginal": (3, 2)}
_KEPT_FORWARD = {"uniform": (1, 1), "marginal": (1, 2)}
_KEPT_BACKWARD = {"uniform": (1, 1), "marginal": (1, 2)}


def _counts(estimator: str, pass_name: str, keeps_scores: bool) -> tuple[int, int]:
    if estimator not in _FORWARD:
        raise ValueError(f"estimator must be 'uniform' or 'marginal'; got {estimator!r}")
    forward, backward = (_KEPT_FORWARD, _KEPT_BACKWARD) if keeps_scores else (_FORWARD,
                                                                              _BACKWARD)
    if pass_name == "forward":
        return forward[estimator]
    if pass_name == "backward":
        return backward[estimator]
    if pass_name == "forward_backward":
        (g1, s1), (g2, s2) = forward[estimator], backward[estimator]
        return g1 + g2, s1 + s2
    raise ValueError(f"pass_name must be one of {PASSES}; got {pass_name!r}")


def gemm_count(estimator: str, pass_name: str, keeps_scores: bool = False) -> int:
    """GEMMs of ``2*M*N*K`` flops that the pass needs (uniform forward: 1, backward: 2; with
    the scores kept, 1 and 1)."""
    return _counts(estimator, pass_name, keeps_scores)[0]


def sweep_count(estimator: str, pass_name: str, keeps_scores: bool = False) -> int:
    """Sweeps of the ``M x N`` scores (each one ``M*N`` exponentials)."""
    return _counts(estimator, pass_name, keeps_scores)[1]


@dataclass(frozen=True)
class Workload:
    """One problem size: ``batch`` maps of ``channels`` channels, ``pixels = H*W`` each,
    ``templates = N``."""

    batch: int
    channels: int
    pixels: int
    templates: int

    @property
    def rows(self) -> int:
        """``M = B*C``, the rows of the score GEMM."""
        return self.batch * self.channels

    @property
    def keeps_scores(self) -> bool:
        """``M <= K``: the ``M x N`` scores are no larger than the templates, and kept."""
        return self.rows <= self.pixels

    @property
    def gemm_flops(self) -> int:
        """``2*M*N*K``: one sweep's multiply-adds, counted as two flops each."""
        return 2 * self.rows * self.templates * self.pixels

    def flops(self, estimator: str, pass_name: str) -> int:
        return gemm_count(estimator, pass_name, self.keeps_scores) * self.gemm_flops

    def exponentials(self, estimator: str, pass_name: str) -> int:
        return sweep_count(estimator, pass_name, self.keeps_scores) * self.rows * self.templates

    def input_bytes(self, element_size: int) -> int:
        """Bytes of ``x``: ``M*K`` elements."""
        return self.rows * self.pixels * element_size

    def template_bytes(self, element_size: int = 4) -> int:
        """Bytes of the ``N x K`` template matrix (965 MB in float32 for 28x28 maps)."""
        return self.templates * self.pixels * element_size

    def score_tensor_bytes(self, element_size: int = 4) -> int:
        """Bytes of one materialised ``B x C x N`` tensor (what the reference keeps several of)."""
        return self.rows * self.templates * element_size
