"""GPU instance catalog for Azure and AWS: what a node brings to the memory plan.

Figures are the clouds' published instance specs (GPU model, count, memory per
GPU) and NVIDIA's compute capabilities (7.0 V100, 7.5 T4, 8.0 A100, 8.6 A10/A10G,
8.9 L4, 9.0 H100/H200). bf16 needs compute capability >= 8.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Cloud = Literal["azure", "aws", "local"]


@dataclass(frozen=True)
class GpuSku:
    name: str
    cloud: Cloud
    gpu: str
    count: int
    memory_gib: float  # per GPU
    compute_capability: float

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= 8.0

    @property
    def total_memory_gib(self) -> float:
        return self.count * self.memory_gib


def _family(cloud: Cloud, gpu: str, mem: float, cc: float, sizes: dict[str, int]) -> list[GpuSku]:
    return [GpuSku(name, cloud, gpu, count, mem, cc) for name, count in sizes.items()]


_CATALOG: list[GpuSku] = [
    # Azure
    *_family(
        "azure",
        "V100",
        16,
        7.0,
        {"Standard_NC6s_v3": 1, "Standard_NC12s_v3": 2, "Standard_NC24s_v3": 4, "Standard_NC24rs_v3": 4},
    ),
    *_family("azure", "V100", 32, 7.0, {"Standard_ND40rs_v2": 8}),
    *_family(
        "azure",
        "T4",
        16,
        7.5,
        {"Standard_NC4as_T4_v3": 1, "Standard_NC8as_T4_v3": 1, "Standard_NC16as_T4_v3": 1, "Standard_NC64as_T4_v3": 4},
    ),
    *_family("azure", "A10", 24, 8.6, {"Standard_NV36ads_A10_v5": 1, "Standard_NV72ads_A10_v5": 2}),
    *_family(
        "azure",
        "A100",
        80,
        8.0,
        {
            "Standard_NC24ads_A100_v4": 1,
            "Standard_NC48ads_A100_v4": 2,
            "Standard_NC96ads_A100_v4": 4,
            "Standard_ND96amsr_A100_v4": 8,
        },
    ),
    *_family("azure", "A100", 40, 8.0, {"Standard_ND96asr_v4": 8}),
    *_family("azure", "H100", 94, 9.0, {"Standard_NC40ads_H100_v5": 1, "Standard_NC80adis_H100_v5": 2}),
    *_family("azure", "H100", 80, 9.0, {"Standard_ND96isr_H100_v5": 8}),
    *_family("azure", "H200", 141, 9.0, {"Standard_ND96isr_H200_v5": 8}),
    # AWS
    *_family("aws", "T4", 16, 7.5, {"g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.12xlarge": 4}),
    *_family("aws", "V100", 16, 7.0, {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8}),
    *_family(
        "aws",
        "A10G",
        24,
        8.6,
        {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8},
    ),
    *_family(
        "aws", "L4", 24, 8.9, {"g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.12xlarge": 4, "g6.48xlarge": 8}
    ),
    *_family("aws", "A100", 40, 8.0, {"p4d.24xlarge": 8}),
    *_family("aws", "A100", 80, 8.0, {"p4de.24xlarge": 8}),
    *_family("aws", "H100", 80, 9.0, {"p5.48xlarge": 8}),
    *_family("aws", "H200", 141, 9.0, {"p5e.48xlarge": 8}),
]

CATALOG: dict[str, GpuSku] = {sku.name.lower(): sku for sku in _CATALOG}


def find_sku(name: str) -> GpuSku | None:
    return CATALOG.get(name.strip().lower())


def skus_by_size() -> list[GpuSku]:
    """Cheapest-looking first: fewest GPUs, then least memory per GPU."""
    return sorted(_CATALOG, key=lambda s: (s.count, s.memory_gib, s.compute_capability, s.name))
