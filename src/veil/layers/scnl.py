"""Stochastic conditional noise layers (SCNL), seed 000/001 §1 and §3.

Per class c, trainable kernels give the raw parameters of a distribution; the layer outputs a
reparameterised sample, never the parameters themselves (Eq. 5-7 of seed 000)::

    mu_c    = x * k_mu_c                      (Eq. 5)
    sigma_c = x * k_sigma_c                   (Eq. 6; made positive by softplus)
    h_c     = mu_c + sigma_c * eps            (Eq. 7; eps ~ N(0, 1), or Laplace/relaxed discrete)

Incarnations: :class:`SCNLConv2d` (§1.1.3), :class:`SCNLLinear` (§1.2.3), :class:`SCNLAdditive`
(per-class learnt gain, offset (template) and scale tensors) and :class:`ConditionalStochastic`, which
makes any module (GRU/LSTM, a transformer block, ...) conditional and stochastic.

Selection (how the C kernel sets are combined; see :mod:`veil.layers.selection`) is chosen by the call:

* ``layer(x, labels)`` with labels (B,) int64 -- **hard selection**: only the selected class's kernels are
  computed for each record (gathered weights + a grouped convolution / batched matmul), so the cost stays
  flat as C grows;
* ``layer(x, mask)`` with a (B, C, *spatial) 0/1 region mask -- per-pixel hard selection (detection):
  pixel p of the input goes through class c's kernels where ``mask[c, p] = 1``; or with an integer region
  map (B, *spatial) of class indices, the same without building a mask of all C classes. Only the kernel
  sets of the classes present in a record are computed (conv, additive), so the cost stays flat in C;
* ``layer(x)`` -- the layer's own selector (soft or adaptive), the inference path;
* ``layer(x, pi=...)`` -- an explicit selection tensor.

With a selection pi, the two incarnations of seed §2.1.1 are::

    incarnation="input":   raw = sum_c k_c * (pi_c ⊙ x) + pi_c ⊙ b_c     (pi multiplies the input)
    incarnation="output":  raw = sum_c pi_c ⊙ (k_c * x + b_c)           (pi multiplies the outputs)

and the distribution's constraint (softplus scale, bounded mean) is applied to the mixed raw maps, so that
hard selection equals either formula with ``pi = one_hot(label)`` (the oracle test checks this). The
bias is weighted by pi so that the identity holds exactly; where pi has one value per input channel and
pixel (a soft selection of the input's shape), the bias of an output pixel is weighted by the mean of
pi_c over the input channels at that pixel (for a strided or padded convolution: at the input pixel the
kernel is centred on).

Everything here runs on the client. The privacy knob lives in the defense (:mod:`veil.defenses.scnl`):
it scales :meth:`SCNLBase.kl`, the VIB charge of the information the layer lets through.
"""

from __future__ import annotations

from veil.layers.learning_rate import _Scale, scale_learning_rate
from veil.layers.scnl_base import CONV_ONLY, DIST_OPTIONS, INCARNATIONS, SCNLBase, _check_dist_options
from veil.layers.scnl_kernels import SCNLConv2d, SCNLLinear, _init_per_class, _pair
from veil.layers.scnl_wrappers import ConditionalStochastic, SCNLAdditive
from veil.layers.selection import check_region_map, mask_slots, region_slots

# The layers live by concept (the shared selection logic, the kernel layers, the wrappers; region masks and
# maps with the other selections); every name stays importable from here.

__all__ = [
    "CONV_ONLY", "DIST_OPTIONS", "INCARNATIONS", "ConditionalStochastic", "SCNLAdditive", "SCNLBase", "SCNLConv2d", "SCNLLinear",
    "check_region_map", "mask_slots", "region_slots", "scale_learning_rate",
]
