"""insightface / CR-FIQA iResNet ``backbone.pth`` -> :mod:`anti_i2v_jax.eval.iresnet`.

Keys rename generically (``layer2.0.downsample.1.running_mean`` -> ``layer2_0/downsample_1/running_mean``;
a 1-D ``weight`` of a norm becomes ``scale``, of a PReLU stays ``weight``). BatchNorm's ``num_batches_tracked``
counters (training bookkeeping) are the only keys set aside.
"""

from __future__ import annotations

from weights_convert.core import TORCH, Rule

IRESNET_RULES = [
    # PReLU slopes are 1-D "weight" tensors that must keep their name (the generic rename would call them scale).
    Rule(r"prelu\.weight", "prelu/weight"),
    Rule(r"(layer\d+)\.(\d+)\.prelu\.weight", r"\1_\2/prelu/weight"),
    Rule(r".*", TORCH),
]
IRESNET_IGNORE = [r".*num_batches_tracked"]
