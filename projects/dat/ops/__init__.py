"""The operators of DAT and DAT++ as functions, apart from the modules that hold their parameters.

One public entry per operator takes the implementation ``impl`` (the backbone's ``attn_impl``)
and computes the reference math or a fast backend, as :func:`select_backend` decides
(:mod:`~projects.dat.ops.dispatch` holds the rule as a table):

- :func:`deformable_attention` (``D`` blocks; :mod:`~projects.dat.ops.deformable`);
- :func:`neighborhood_attention` (``N`` blocks; :mod:`~projects.dat.ops.neighborhood`);
- :func:`depthwise_conv_gelu`, ConvFFN's hidden layer, and :func:`depthwise_conv_gelu_linear`, the
  hidden layer and the 1x1 conv after it, keeping only the hidden layer's input for the backward
  pass (:mod:`~projects.dat.ops.convffn`);
- :func:`strided_depthwise_conv`, the offset network's conv (:mod:`~projects.dat.ops.depthwise_conv`);
- :func:`sample_keys`, the ``D`` blocks' bilinear read of their keys (:mod:`~projects.dat.ops.key_sampling`).

:mod:`~projects.dat.ops.reference` holds the reference math of all of them, and the functions
that have a single implementation: :func:`window_attention` (``L``/``S`` blocks),
:func:`depthwise_conv_plus_identity` (the local perception unit), :func:`gelu_2d` and
:func:`pointwise_conv_2d`.
Importing this package defines the custom operators ``torch.ops.dat.*`` (on torch >= 2.4).
"""

from .convffn import depthwise_conv_gelu, depthwise_conv_gelu_linear
from .deformable import deformable_attention
from .depthwise_conv import strided_depthwise_conv
from .dispatch import ATTN_IMPLS, BACKENDS, check_attn_impl, select_backend
from .key_sampling import sample_keys
from .neighborhood import neighborhood_attention
from .reference import (
    deformable_attention_logits,
    deformable_attention_reference,
    depthwise_conv_gelu_reference,
    depthwise_conv_plus_identity,
    gelu_2d,
    neighborhood_attention_reference,
    pointwise_conv_2d,
    sample_keys_reference,
    window_attention,
)

__all__ = [
    'ATTN_IMPLS',
    'BACKENDS',
    'check_attn_impl',
    'select_backend',
    'deformable_attention',
    'neighborhood_attention',
    'depthwise_conv_gelu',
    'depthwise_conv_gelu_linear',
    'strided_depthwise_conv',
    'sample_keys',
    'window_attention',
    'deformable_attention_logits',
    'deformable_attention_reference',
    'neighborhood_attention_reference',
    'depthwise_conv_gelu_reference',
    'sample_keys_reference',
    'depthwise_conv_plus_identity',
    'gelu_2d',
    'pointwise_conv_2d',
]
