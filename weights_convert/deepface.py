"""DeepFace's Keras weight files -> :mod:`anti_i2v_jax.eval.deepface`.

``arcface_weights.h5`` (DeepFace's ArcFace, a ResNet34 that is insightface's iResNet-34 in Keras) maps onto
:class:`anti_i2v_jax.eval.iresnet.IResNet`: Keras block ``conv<s>_block<b>_<i>_<kind>`` is iResNet
``layer<s-1>_<b-1>/<name>``; the head's unnamed BatchNorm and Dense (Keras calls them ``batch_normalization`` and
``dense``, maybe with a numeric suffix) are ``bn2`` and ``fc``; ``embedding`` is ``features``. ``retinaface.h5``
maps onto :class:`anti_i2v_jax.eval.deepface.RetinaFaceNet`, whose modules carry the Keras layer names. BatchNorm's
``gamma/beta/moving_mean/moving_variance`` are ``scale/bias/running_mean/running_var``; kernels keep their layout.
"""

from __future__ import annotations

from weights_convert.core import Rule

_BN = {"gamma": "scale", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _bn(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}/{k}", f"{dst}/{v}") for k, v in _BN.items()]


def arcface_rules(layers: tuple[int, ...]) -> list[Rule]:
    """The rule table for a DeepFace ArcFace with ``layers`` blocks per stage ((3, 4, 6, 3) for its ResNet34)."""
    rules = [Rule("conv1_conv/kernel", "conv1/kernel"), *_bn("conv1_bn", "bn1"),
             Rule("conv1_prelu/alpha", "prelu/weight", "flatten")]
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            k, t = f"conv{stage + 1}_block{b + 1}", f"layer{stage}_{b}"
            rules += [Rule(f"{k}_0_conv/kernel", f"{t}/downsample_0/kernel"), *_bn(f"{k}_0_bn", f"{t}/downsample_1"),
                      *_bn(f"{k}_1_bn", f"{t}/bn1"), Rule(f"{k}_1_conv/kernel", f"{t}/conv1/kernel"),
                      *_bn(f"{k}_2_bn", f"{t}/bn2"), Rule(f"{k}_1_prelu/alpha", f"{t}/prelu/weight", "flatten"),
                      Rule(f"{k}_2_conv/kernel", f"{t}/conv2/kernel"), *_bn(f"{k}_3_bn", f"{t}/bn3")]
    return [*rules, *_bn(r"batch_normalization(?:_\d+)?", "bn2"), Rule(r"dense(?:_\d+)?/(kernel|bias)", r"fc/\1"),
            *_bn("embedding", "features")]


RETINAFACE_RULES = [*(Rule(rf"(\w+)/{k}", rf"\1/{v}") for k, v in _BN.items()), Rule(r"(\w+)/(kernel|bias)", r"\1/\2")]
