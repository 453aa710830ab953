"""Model FLOPs of a jaxpr, counted from shapes (``jaxpr_flops``): the numerator of the step benchmark's MFU.

Pure Python over a jaxpr's equations; it imports nothing from JAX, so it can be imported before flags
are parsed.
"""

from __future__ import annotations

import math


def jaxpr_flops(jaxpr) -> float:
    """Model FLOPs of a jaxpr: 2 x the multiply-adds of every convolution and matrix product, dense.

    Counted from shapes (padding taps included, as the usual "4.1 G multiply-adds" of ResNet-50), the
    same on every backend; XLA's own cost analysis misses convolutions handed to cuDNN on GPU. Bodies of
    ``scan`` count ``length`` times, of ``shard_map`` once per device, of ``pmap`` once per replica.
    """
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "conv_general_dilated":
            rhs, out = e.invars[1].aval.shape, e.outvars[0].aval.shape
            spec = e.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            macs = math.prod(out) * rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
            # A transposed (input-gradient) strided conv dilates its input with zeros: skip those taps.
            total += 2.0 * macs / math.prod(e.params.get("lhs_dilation") or (1,))
        elif name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * math.prod(e.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        times = 1
        if name == "scan":
            times = e.params["length"]
        elif name == "shard_map":
            times = e.params["mesh"].size
        elif name == "xla_pmap":
            times = e.params["axis_size"]
        for value in e.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += times * jaxpr_flops(inner)
    return total
