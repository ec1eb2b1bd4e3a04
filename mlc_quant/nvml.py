"""The card's energy counter, power, SM clock and throttle reasons, read through NVML (ctypes).

Under a sustained prefill an H100 / H200 runs into its board power limit (700 W) and lowers its
SM clock; from then on a build's speed is set by the energy each prefill takes, not by its
kernel times at full clock (docs/performance.md, session 9). The benchmarks read the energy
counter around timed work to report joules per call next to the time.

NVML comes with the driver (``libnvidia-ml.so.1``); where it is missing, :func:`open_card`
returns None and callers leave the energy columns out.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

NVML_CLOCK_SM = 1
SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap


@dataclass
class Sample:
    energy_mj: int  # since the driver loaded
    power_w: float
    sm_mhz: int
    reasons: int  # clock event (throttle) reasons bit mask


class Card:
    """One GPU's NVML handle. ``read()`` returns a :class:`Sample`."""

    def __init__(self, lib, handle):
        self._lib, self._h = lib, handle

    def _u(self, fn, *args, kind=ctypes.c_uint):
        v = kind()
        rc = getattr(self._lib, fn)(self._h, *args, ctypes.byref(v))
        if rc != 0:
            raise RuntimeError(f"NVML {fn} failed ({rc})")
        return v.value

    def energy_mj(self) -> int:
        return self._u("nvmlDeviceGetTotalEnergyConsumption", kind=ctypes.c_ulonglong)

    def read(self) -> Sample:
        try:
            reasons = self._u("nvmlDeviceGetCurrentClocksEventReasons", kind=ctypes.c_ulonglong)
        except (RuntimeError, AttributeError):  # older drivers: the pre-rename name
            reasons = self._u("nvmlDeviceGetCurrentClocksThrottleReasons", kind=ctypes.c_ulonglong)
        return Sample(self.energy_mj(), self._u("nvmlDeviceGetPowerUsage") / 1e3,
                      self._u("nvmlDeviceGetClockInfo", ctypes.c_int(NVML_CLOCK_SM)), reasons)

    def power_limit_w(self) -> float:
        return self._u("nvmlDeviceGetEnforcedPowerLimit") / 1e3


def open_card(pci_bus_id: Optional[str] = None, index: int = 0) -> Optional[Card]:
    """The card with this PCI bus id ("0000:19:00.0", as CUDA reports it) or NVML index; None
    where NVML or its energy counter is not available."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    h = ctypes.c_void_p()
    if pci_bus_id:
        rc = lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(h))
    else:
        rc = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(h))
    if rc != 0:
        return None
    card = Card(lib, h)
    try:
        card.energy_mj()
    except RuntimeError:
        return None
    return card


def card_of_torch_device(torch, device: int = 0) -> Optional[Card]:
    """The NVML card behind a torch CUDA device (matched by PCI bus id where torch reports it)."""
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        bus_id = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        card = open_card(bus_id)
        if card is not None:
            return card
    return open_card(index=device)
