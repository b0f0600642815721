"""Weight storage formats: how many bytes a stored vector of weights costs.

One table for the whole project (accounting, the prefetch simulator, reports). Integer formats follow
GGUF's block layouts, what edge runtimes (llama.cpp) actually store: ``int8`` = Q8_0, blocks of 32
int8 weights with one fp16 scale (8.5 bits/weight); ``int4`` = Q4_0, blocks of 32 4-bit weights with
one fp16 scale (4.5 bits/weight) (ggml ``block_q8_0`` / ``block_q4_0``). A vector of ``n`` weights
costs ``vec_bits(n) = n * bits + ceil(n / group_size) * group_bits`` bits. One-dimensional parameters
(biases, norms) are kept at ``vector_bits`` (the float width; 16 for integer formats).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WeightFormat", "FORMATS", "weight_format"]


@dataclass(frozen=True)
class WeightFormat:
    """How one weight vector is stored.

    Attributes:
        name: format name.
        bits: bits per weight.
        group_size: weights sharing one group header along a vector; ``None`` for float formats.
        group_bits: bits of one group header (scale, and zero point if asymmetric).
        vector_bits: bits per value of 1-D parameters (biases, norm weights).
    """

    name: str
    bits: int
    group_size: int | None = None
    group_bits: int = 0
    vector_bits: int = 16

    def vec_bits(self, n: int) -> int:
        """Bits of an ``n``-long weight vector: ``n * bits + ceil(n / group_size) * group_bits``."""
        groups = 0 if self.group_size is None else -(-n // self.group_size)
        return n * self.bits + groups * self.group_bits

    def vector_bytes(self, n: int) -> int:
        """Bytes of an ``n``-long weight vector stored on its own: ``ceil(vec_bits(n) / 8)``."""
        return -(-self.vec_bits(n) // 8)

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight for long vectors (``bits + group_bits / group_size``)."""
        return self.bits + (self.group_bits / self.group_size if self.group_size else 0.0)

    def describe(self) -> str:
        if self.group_size is None:
            return f"{self.name}: {self.bits} bits/weight"
        return (f"{self.name}: {self.bits} bits/weight + {self.group_bits}-bit header per {self.group_size} weights "
                f"= {self.bits_per_weight:g} bits/weight; vectors at {self.vector_bits} bits")


FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", 32, vector_bits=32),
    "fp16": WeightFormat("fp16", 16, vector_bits=16),
    "bf16": WeightFormat("bf16", 16, vector_bits=16),
    "int8": WeightFormat("int8", 8, group_size=32, group_bits=16, vector_bits=16),  # GGUF Q8_0
    "int4": WeightFormat("int4", 4, group_size=32, group_bits=16, vector_bits=16),  # GGUF Q4_0
}
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "q8_0": "int8", "q4_0": "int4"}


def weight_format(name: str | WeightFormat) -> WeightFormat:
    """Look up a format by name (``torch`` dtype names accepted); errors list the options."""
    if isinstance(name, WeightFormat):
        return name
    key = _ALIASES.get(name, name)
    if key not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[key]
