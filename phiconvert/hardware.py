"""What machine are we on, and which target suits it: the facts behind `--target auto` and `phiconvert doctor`.

`probe()` reads the live system with the standard library and psutil only (OpenVINO and torch are asked lazily,
only when a device they could name is already known to exist), so it works before any target extra is installed.
Every source is optional: whatever cannot be read stays unknown, and `probe()` never raises. The decision itself,
`recommend()`, is a pure function of a `Machine`, so recorded machines (tests/machines/*.json) test it anywhere.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

# Where /proc, /sys and /dev are read from on Linux; tests point it at a recorded tree.
ROOT = Path("/")

# CPU flags worth showing: they decide which int4 kernels a runtime can use. Label order is display order.
LINUX_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_tile": "AMX",
    "asimd": "NEON",
    "neon": "NEON",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "SVE",
}
MACOS_FLAGS = {
    "hw.optional.avx2_0": "AVX2",
    "hw.optional.avx512f": "AVX-512",
    "hw.optional.avx512vnni": "AVX512-VNNI",
    "hw.optional.AdvSIMD": "NEON",
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}
# IsProcessorFeaturePresent ids (winnt.h); Windows reports neither AMX nor the VNNI extensions.
WINDOWS_FLAGS = {40: "AVX2", 41: "AVX-512", 29: "NEON", 43: "dotprod", 66: "i8mm", 46: "SVE"}
X86_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}
# /proc/cpuinfo "CPU implementer" on ARM: aarch64 Linux has no model name line.
ARM_IMPLEMENTERS = {"0x41": "ARM", "0x51": "Qualcomm", "0x61": "Apple", "0x48": "HiSilicon", "0xc0": "Ampere"}
ARM_VENDORS = set(ARM_IMPLEMENTERS.values())
# Words that name a vendor in a brand or identifier string, checked in this order (see _vendor_from_text).
VENDOR_WORDS = (
    ("qualcomm", "Qualcomm"),
    ("snapdragon", "Qualcomm"),
    ("apple", "Apple"),
    ("intel", "Intel"),
    ("amd", "AMD"),
)
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd05": "Cortex-A55",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}
LOW_RAM_GIB = 8.0
LOW_GPU_GIB = 6.0


@dataclass
class Machine:
    """Facts about one machine. Empty strings, empty lists and None mean "not found or could not be read"."""

    os: str = ""  # platform.system(): Linux, Darwin, Windows
    os_version: str = ""
    arch: str = ""  # platform.machine() of this Python: x86_64, AMD64, arm64, aarch64, ARM64
    python: str = ""
    cpu_vendor: str = ""  # Intel, AMD, Apple, Qualcomm, ARM, ...
    cpu_model: str = ""  # as the system reports it, e.g. "Intel(R) Core(TM) Ultra 7 155H"
    cpu_features: list[str] = field(default_factory=list)  # labels from the *_FLAGS tables
    cpu_cores: int | None = None  # physical
    cpu_threads: int | None = None  # logical
    ram_gib: float | None = None
    soc: str = ""  # board or system-on-chip, e.g. "Raspberry Pi 4 Model B Rev 1.4", "Snapdragon X1E80100"
    intel_gpu: str = ""
    intel_npu: str = ""
    nvidia_gpu: str = ""  # the NVIDIA GPU with the most memory
    nvidia_memory_gib: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Machine:
        """Build from JSON (a recording or `asdict(probe())`); unknown keys are ignored so old recordings load."""
        known = {f.name for f in fields(cls)}
        machine = cls(**{k: v for k, v in data.items() if k in known})
        machine.cpu_features = list(machine.cpu_features)
        return machine

    @property
    def apple_silicon(self) -> bool:
        # cpu_vendor covers an x86_64 Python running under Rosetta on an M-series Mac
        return self.os == "Darwin" and (self.arch == "arm64" or self.cpu_vendor == "Apple")

    @property
    def arm(self) -> bool:
        # the vendor covers an x64 Python emulated on Windows on ARM, whose arch reads AMD64
        return self.arch.lower().startswith(("arm", "aarch64")) or self.cpu_vendor in ARM_VENDORS


@dataclass(frozen=True)
class Recommendation:
    target: str
    precision: str
    reason: str  # one line: the machine, the choice, and why


def probe() -> Machine:
    """Read the live machine. Each step fills what it can; a failing source leaves its facts unknown."""
    machine = Machine(
        os=platform.system(), arch=platform.machine(), python=platform.python_version(), os_version=_os_version()
    )
    steps: list[Callable[[Machine], None]] = [_memory]
    if machine.os == "Linux":
        steps += [_linux_cpu, _linux_intel_devices]
    elif machine.os == "Darwin":
        steps += [_macos_cpu]
    elif machine.os == "Windows":
        steps += [_windows_cpu, _windows_intel_devices]
    steps += [_openvino_names, _nvidia]
    for step in steps:
        try:
            step(machine)
        except Exception:  # a probe must never stop `doctor` or `--target auto`
            pass
    return machine


def recommend(machine: Machine) -> Recommendation:
    """The target and precision that run best here. Pure: depends on the recorded facts only."""
    name = _machine_name(machine)
    if machine.apple_silicon:
        rec = Recommendation("mlx", "4bit", f"{name} → mlx 4bit (MLX runs on the Apple GPU with unified memory)")
    elif machine.nvidia_gpu:
        rec = _nvidia_recommendation(machine)
    elif machine.cpu_vendor == "Intel" or machine.intel_gpu or machine.intel_npu:
        rec = _intel_recommendation(machine, name)
    elif machine.arm:
        qnn = " and Qualcomm QNN" if machine.cpu_vendor == "Qualcomm" else ""
        why = f"ONNX Runtime GenAI has ARM CPU{qnn} paths; gguf via llama.cpp is the alternative"
        rec = Recommendation("ort-genai", "int4", f"{name} → ort-genai int4 ({why})")
    else:
        x86 = any(f in machine.cpu_features for f in ("AVX2", "AVX-512"))
        why = "llama.cpp is fastest on plain AVX2/AVX-512 CPUs" if x86 else "llama.cpp runs on almost any CPU"
        rec = Recommendation("gguf", "q4_k_m", f"{name} → gguf q4_k_m ({why})")
    if machine.ram_gib is not None and machine.ram_gib < LOW_RAM_GIB:
        note = f"; only {machine.ram_gib:.0f} GiB RAM: int4 needs ~3 GiB for Phi-4-mini"
        rec = Recommendation(rec.target, rec.precision, rec.reason + note)
    return rec


def describe(machine: Machine) -> list[tuple[str, str]]:
    """(label, value) rows for the `phiconvert doctor` table; unknown facts say so instead of being left out."""
    os_name = {"Darwin": "macOS"}.get(machine.os, machine.os)
    system = machine.os_version if os_name in machine.os_version else f"{os_name} {machine.os_version}"
    system = ", ".join(s for s in (system.strip(), machine.arch) if s) or "unknown"
    cpu = _clean(machine.cpu_model) or "unknown"
    if machine.cpu_vendor and machine.cpu_vendor not in cpu:
        cpu = f"{cpu} ({machine.cpu_vendor})"
    cores = ", ".join(
        f"{n} {label}" for n, label in ((machine.cpu_cores, "cores"), (machine.cpu_threads, "threads")) if n
    )
    nvidia = machine.nvidia_gpu or "not found"
    if machine.nvidia_gpu and machine.nvidia_memory_gib is not None:
        nvidia = f"{machine.nvidia_gpu}, {machine.nvidia_memory_gib:.0f} GiB"
    rows = [
        ("System", system),
        ("Python", machine.python or "unknown"),
        ("CPU", cpu),
        ("Cores", cores or "unknown"),
        ("CPU features", ", ".join(machine.cpu_features) or "none detected"),
        ("RAM", f"{machine.ram_gib:.1f} GiB" if machine.ram_gib is not None else "unknown"),
    ]
    if machine.soc:
        rows.append(("Board / SoC", machine.soc))
    rows += [
        ("Intel GPU", machine.intel_gpu or "not found"),
        ("Intel NPU", machine.intel_npu or "not found"),
        ("NVIDIA GPU", nvidia),
    ]
    return rows


# --- recommendation helpers ---


def _nvidia_recommendation(machine: Machine) -> Recommendation:
    memory = machine.nvidia_memory_gib
    name = f"{machine.nvidia_gpu} ({memory:.0f} GiB)" if memory is not None else machine.nvidia_gpu
    reason = f"{name} → gptq int4 (GPTQ int4 kernels run on CUDA)"
    if memory is not None and memory < LOW_GPU_GIB:
        reason += f"; only {memory:.0f} GiB of GPU memory: enough for Phi-4-mini int4 (~3 GiB), not for Phi-4"
    return Recommendation("gptq", "int4", reason)


def _intel_recommendation(machine: Machine, name: str) -> Recommendation:
    extras = []
    if machine.intel_gpu:
        extras.append("Arc GPU" if re.search(r"\barc\b", machine.intel_gpu.lower()) else "Intel GPU")
    if machine.intel_npu:
        extras.append("NPU")
    if extras:
        devices = ["CPU", "GPU"] if machine.intel_gpu else ["CPU"]
        devices += ["NPU"] if machine.intel_npu else []
        where = ", ".join(devices[:-1]) + " and " + devices[-1]
        name += " with " + " and ".join(extras)
    elif "AMX" in machine.cpu_features:
        where = "the CPU, using AMX"
    else:
        where = "the CPU"
    return Recommendation("openvino", "int4", f"{name} → openvino int4 (runs on {where})")


def _machine_name(machine: Machine) -> str:
    """A short human name: the CPU, or the board for ARM boards whose CPU line says little."""
    cpu = _clean(machine.cpu_model)
    if machine.soc and (machine.arm or not cpu):
        return machine.soc
    return cpu or (f"{machine.cpu_vendor} CPU" if machine.cpu_vendor else "this machine")


def _clean(model: str) -> str:
    """'Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz' -> 'Intel Core i7-8700': trademarks and clock speeds are noise."""
    model = re.sub(r"\((R|TM|r|tm)\)|®|™", "", model)
    model = re.sub(r"\s+(CPU\s+)?@\s*[\d.]+\s*GHz", "", model)
    model = re.sub(r"\s+\d+-Core Processor|\s+Processor$|\s+CPU$", "", model)
    return " ".join(model.split())


# --- probe steps: each reads one kind of source and fills the facts it finds ---


def _os_version() -> str:
    system = platform.system()
    if system == "Darwin":
        return platform.mac_ver()[0]
    if system == "Windows":
        return platform.version()
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "") or platform.release()
    except OSError:
        return platform.release()


def _memory(machine: Machine) -> None:
    machine.ram_gib = round(psutil.virtual_memory().total / 2**30, 1)
    machine.cpu_cores = psutil.cpu_count(logical=False)
    machine.cpu_threads = psutil.cpu_count(logical=True)


def _linux_cpu(machine: Machine) -> None:
    """x86 reports vendor_id/model name/flags; aarch64 only implementer/part/Features, so the board names it."""
    values: dict[str, list[str]] = {}
    for line in (_read(ROOT / "proc/cpuinfo") or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), []).append(value.strip())

    def first(key: str) -> str:
        return values.get(key, [""])[0]

    flags = set(first("flags").split()) | set(first("Features").split())
    machine.cpu_features = _labels(LINUX_FLAGS, flags)
    machine.cpu_vendor = X86_VENDORS.get(first("vendor_id"), first("vendor_id"))
    machine.cpu_model = first("model name")
    if not machine.cpu_vendor:
        machine.cpu_vendor = ARM_IMPLEMENTERS.get(first("CPU implementer").lower(), "")
        parts = dict.fromkeys(ARM_PARTS.get(p.lower(), "") for p in values.get("CPU part", []))
        machine.cpu_model = " + ".join(p for p in parts if p) or machine.cpu_model
    machine.soc = (_read(ROOT / "proc/device-tree/model") or "").strip("\x00\n ") or first("Model")
    # Qualcomm's socinfo driver names the chip; some Snapdragons have ARM-designed cores (implementer 0x41)
    if (_read(ROOT / "sys/devices/soc0/family") or "").strip().lower() == "snapdragon":
        machine.cpu_vendor = "Qualcomm"
        machine.soc = f"Snapdragon {(_read(ROOT / 'sys/devices/soc0/machine') or '').strip()}".strip()


def _linux_intel_devices(machine: Machine) -> None:
    """GPUs are DRM cards with PCI vendor 0x8086; the NPU is an accel device bound to the intel_vpu driver."""
    gpus = []
    for card in sorted((ROOT / "sys/class/drm").glob("card*")):
        if card.name[4:].isdigit() and _pci_vendor(card) == "0x8086":
            gpus.append(f"Intel GPU ({_pci_id(card)})")
    npus = []
    for accel in sorted((ROOT / "sys/class/accel").glob("accel*")):
        driver = (accel / "device/driver").resolve().name if (accel / "device/driver").exists() else ""
        if driver == "intel_vpu" or _pci_vendor(accel) == "0x8086":
            npus.append(f"Intel NPU ({_pci_id(accel)})")
    machine.intel_gpu = ", ".join(gpus)
    machine.intel_npu = ", ".join(npus)


def _pci_vendor(node: Path) -> str:
    return (_read(node / "device/vendor") or "").strip().lower()


def _pci_id(node: Path) -> str:
    device = (_read(node / "device/device") or "").strip().lower().removeprefix("0x")
    return f"8086:{device}" if device else "8086"


def _macos_cpu(machine: Machine) -> None:
    """Two calls: macOS sysctl may stop at the first unknown name, and proc_translated is unknown on Intel Macs."""
    out = _run(["sysctl", "machdep.cpu.brand_string", "hw.optional"])  # a node name lists its whole subtree
    values = {"sysctl.proc_translated": _run(["sysctl", "-n", "sysctl.proc_translated"]).strip()}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    machine.cpu_model = values.get("machdep.cpu.brand_string", "")
    machine.cpu_vendor = _vendor_from_text(machine.cpu_model)
    if values.get("sysctl.proc_translated") == "1":  # Rosetta: the brand string may not say Apple
        machine.cpu_vendor = "Apple"
    machine.cpu_features = [label for key, label in MACOS_FLAGS.items() if values.get(key) == "1"]


def _windows_cpu(machine: Machine) -> None:
    import ctypes
    import winreg

    vendor = ""
    try:
        key_path = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key_path) as key:
            machine.cpu_model = str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
            vendor = str(winreg.QueryValueEx(key, "VendorIdentifier")[0])
    except OSError:
        machine.cpu_model = platform.processor()  # "Intel64 Family 6 Model 170 Stepping 4, GenuineIntel"
    machine.cpu_vendor = _vendor_from_text(f"{vendor} {machine.cpu_model}")
    present = ctypes.windll.kernel32.IsProcessorFeaturePresent  # type: ignore[attr-defined]
    machine.cpu_features = list(dict.fromkeys(label for pf, label in WINDOWS_FLAGS.items() if present(pf)))


def _windows_intel_devices(machine: Machine) -> None:
    """One CIM query: display adapters, and the Intel NPU, which its driver names "Intel(R) AI Boost"."""
    script = (
        "(Get-CimInstance Win32_VideoController).Name; "
        "(Get-CimInstance Win32_PnPEntity -Filter \"Name LIKE '%AI Boost%'\").Name"
    )
    names = [line.strip() for line in _run(["powershell", "-NoProfile", "-Command", script]).splitlines()]
    machine.intel_npu = ", ".join(n for n in names if "AI Boost" in n)
    machine.intel_gpu = ", ".join(n for n in names if "Intel" in n and "AI Boost" not in n)


def _openvino_names(machine: Machine) -> None:
    """OpenVINO names the devices it can use ("Intel(R) Arc(TM) Graphics (iGPU)"). Importing it takes about a
    second, so on Linux it is asked only once sysfs has found an Intel GPU or NPU (it cannot see any other)."""
    if machine.os == "Linux" and not (machine.intel_gpu or machine.intel_npu):
        return
    if machine.os not in ("Linux", "Windows"):
        return
    devices = _openvino_devices()
    gpus = [name for device, name in devices.items() if device.startswith("GPU")]
    npus = [name for device, name in devices.items() if device.startswith("NPU")]
    if gpus:
        machine.intel_gpu = ", ".join(gpus)
    if npus:
        machine.intel_npu = ", ".join(npus)


def _openvino_devices() -> dict[str, str]:
    """OpenVINO device id -> full name, or {} when OpenVINO is not installed."""
    if importlib.util.find_spec("openvino") is None:
        return {}
    import openvino

    core = openvino.Core()
    return {device: str(core.get_property(device, "FULL_DEVICE_NAME")) for device in core.available_devices}


def _nvidia(machine: Machine) -> None:
    """nvidia-smi ships with the driver; torch is imported only when the Linux driver is loaded but has no CLI."""
    gpus: list[tuple[str, float]] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        out = _run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
        for line in out.splitlines():
            name, sep, mib = line.rpartition(",")
            if sep and mib.strip().isdigit():
                gpus.append((name.strip(), int(mib) / 1024))
    elif (ROOT / "proc/driver/nvidia/gpus").is_dir() and importlib.util.find_spec("torch") is not None:
        import torch

        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append((props.name, props.total_memory / 2**30))
    if gpus:
        name, gib = max(gpus, key=lambda gpu: gpu[1])
        machine.nvidia_gpu, machine.nvidia_memory_gib = name, round(gib, 1)


# --- small readers that turn an unreadable source into "nothing" ---


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _run(command: list[str]) -> str:
    """stdout of a command, kept even when it exits non-zero; "" when it is missing or hangs."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _labels(table: dict[str, str], flags: set[str]) -> list[str]:
    return list(dict.fromkeys(label for flag, label in table.items() if flag in flags))


def _vendor_from_text(text: str) -> str:
    """Vendor named in a brand or identifier string: "GenuineIntel", "AMD Ryzen 5 4600H", "Snapdragon(R) X Elite"."""
    lower = text.lower()
    return next((vendor for needle, vendor in VENDOR_WORDS if needle in lower), "")
