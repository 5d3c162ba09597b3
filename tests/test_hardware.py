"""Hardware detection and the `--target auto` choice, on recorded machines and on this one.

tests/machines/*.json are `Machine` records (the dev-vm one was written by `probe()` on the development VM);
*.cpuinfo and *.nvidia-smi.csv are raw outputs that the probe reads from a fake root instead of the live system.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest

from phiconvert import hardware
from phiconvert.hardware import Machine, describe, probe, recommend

MACHINES = Path(__file__).parent / "machines"

# recording -> (target, precision, reason)
EXPECTED = {
    "intel-core-ultra-7-155h-linux": (
        "openvino",
        "int4",
        "Intel Core Ultra 7 155H with Arc GPU and NPU → openvino int4 (runs on CPU, GPU and NPU)",
    ),
    "intel-xeon-platinum-8480-server": (
        "openvino",
        "int4",
        "Intel Xeon Platinum 8480+ → openvino int4 (runs on the CPU, using AMX)",
    ),
    "amd-ryzen-9-7950x-desktop": (
        "gguf",
        "q4_k_m",
        "AMD Ryzen 9 7950X → gguf q4_k_m (llama.cpp is fastest on plain AVX2/AVX-512 CPUs)",
    ),
    "apple-m3-macbook-air": (
        "mlx",
        "4bit",
        "Apple M3 → mlx 4bit (MLX runs on the Apple GPU with unified memory)",
    ),
    "nvidia-rtx-4090-linux": (
        "gptq",
        "int4",
        "NVIDIA GeForce RTX 4090 (24 GiB) → gptq int4 (GPTQ int4 kernels run on CUDA)",
    ),
    "nvidia-gtx-1650-laptop-windows": (
        "gptq",
        "int4",
        "NVIDIA GeForce GTX 1650 (4 GiB) → gptq int4 (GPTQ int4 kernels run on CUDA); only 4 GiB of GPU memory: "
        "enough for Phi-4-mini int4 (~3 GiB), not for Phi-4",
    ),
    "snapdragon-x-elite-windows": (
        "ort-genai",
        "int4",
        "Snapdragon X Elite - X1E78100 - Qualcomm Oryon → ort-genai int4 (ONNX Runtime GenAI has ARM CPU and "
        "Qualcomm QNN paths; gguf via llama.cpp is the alternative)",
    ),
    "raspberry-pi-4-4gb": (
        "ort-genai",
        "int4",
        "Raspberry Pi 4 Model B Rev 1.4 → ort-genai int4 (ONNX Runtime GenAI has ARM CPU paths; gguf via llama.cpp "
        "is the alternative); only 4 GiB RAM: int4 needs ~3 GiB for Phi-4-mini",
    ),
    "dev-vm-amd-epyc": (
        "gguf",
        "q4_k_m",
        "AMD EPYC → gguf q4_k_m (llama.cpp is fastest on plain AVX2/AVX-512 CPUs)",
    ),
}


def recorded(name: str) -> Machine:
    return Machine.from_dict(json.loads((MACHINES / f"{name}.json").read_text()))


def test_every_recording_has_an_expectation():
    assert {p.stem for p in MACHINES.glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recommend_recorded_machine(name):
    rec = recommend(recorded(name))
    assert (rec.target, rec.precision, rec.reason) == EXPECTED[name]
    assert "\n" not in rec.reason


def test_recommend_unknown_machine_is_portable():
    rec = recommend(Machine())
    assert (rec.target, rec.precision) == ("gguf", "q4_k_m")
    assert rec.reason == "this machine → gguf q4_k_m (llama.cpp runs on almost any CPU)"


def test_intel_gpu_beside_an_amd_cpu_picks_openvino():
    machine = recorded("amd-ryzen-9-7950x-desktop")
    machine.intel_gpu = "Intel(R) Arc(TM) A770 Graphics (dGPU)"
    rec = recommend(machine)
    assert rec.target == "openvino"
    assert rec.reason == "AMD Ryzen 9 7950X with Arc GPU → openvino int4 (runs on CPU and GPU)"


def test_emulated_x64_python_on_snapdragon_still_counts_as_arm():
    machine = recorded("snapdragon-x-elite-windows")
    machine.arch = "AMD64"
    assert recommend(machine).target == "ort-genai"


def test_describe_rows():
    rows = dict(describe(recorded("nvidia-rtx-4090-linux")))
    assert list(rows) == [
        "System",
        "Python",
        "CPU",
        "Cores",
        "CPU features",
        "RAM",
        "Intel GPU",
        "Intel NPU",
        "NVIDIA GPU",
    ]
    assert rows["System"] == "Linux Ubuntu 22.04.4 LTS, x86_64"
    assert rows["CPU"] == "13th Gen Intel Core i9-13900K"
    assert rows["Cores"] == "24 cores, 32 threads"
    assert rows["CPU features"] == "AVX2, AVX-VNNI"
    assert rows["RAM"] == "62.6 GiB"
    assert rows["Intel NPU"] == "not found"
    assert rows["NVIDIA GPU"] == "NVIDIA GeForce RTX 4090, 24 GiB"

    pi = dict(describe(recorded("raspberry-pi-4-4gb")))
    assert pi["Board / SoC"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert pi["CPU"] == "Cortex-A72 (ARM)"
    assert dict(describe(recorded("apple-m3-macbook-air")))["System"] == "macOS 14.6.1, arm64"
    assert dict(describe(Machine()))["RAM"] == "unknown"


def test_from_dict_tolerates_old_and_new_keys():
    machine = Machine.from_dict({"os": "Linux", "cpu_features": ("AVX2",), "gpu_count": 3})
    assert machine == Machine(os="Linux", cpu_features=["AVX2"])


def test_probe_this_machine_is_sane_and_round_trips():
    machine = probe()
    assert machine.os == platform.system()
    assert machine.python == platform.python_version()
    assert machine.ram_gib is not None and machine.ram_gib > 1
    assert machine.cpu_threads is not None and machine.cpu_threads >= 1
    assert machine.cpu_cores is None or machine.cpu_cores >= 1
    assert Machine.from_dict(asdict(machine)) == machine
    assert Machine.from_dict(json.loads(json.dumps(asdict(machine)))) == machine
    assert recommend(machine).target in ("openvino", "mlx", "gptq", "ort-genai", "gguf")


# --- the Linux probe on recorded /proc and /sys trees ---


@pytest.fixture
def fake_linux(tmp_path, monkeypatch):
    """A Linux probe that reads /proc and /sys from tmp_path/root, finds no commands and has no OpenVINO."""
    root = tmp_path / "root"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setattr(hardware, "ROOT", root)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(hardware, "_openvino_devices", dict)
    return root


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.skipif(os.name == "nt", reason="the fake sysfs uses a symlink for the driver")
def test_probe_linux_intel_ai_pc(fake_linux, monkeypatch):
    write(
        fake_linux,
        {
            "proc/cpuinfo": (MACHINES / "intel-core-ultra-7-155h.cpuinfo").read_text(),
            "sys/class/drm/card0/device/vendor": "0x8086\n",
            "sys/class/drm/card0/device/device": "0x7d55\n",
            "sys/class/drm/card0-eDP-1/status": "connected\n",  # a connector, not a GPU
            "sys/class/accel/accel0/device/vendor": "0x8086\n",
            "sys/class/accel/accel0/device/device": "0x7d1d\n",
            "sys/bus/pci/drivers/intel_vpu/bind": "",
        },
    )
    (fake_linux / "sys/class/accel/accel0/device/driver").symlink_to(fake_linux / "sys/bus/pci/drivers/intel_vpu")
    machine = probe()
    assert (machine.cpu_vendor, machine.cpu_model) == ("Intel", "Intel(R) Core(TM) Ultra 7 155H")
    assert machine.cpu_features == ["AVX2", "AVX-VNNI"]
    assert (machine.intel_gpu, machine.intel_npu) == ("Intel GPU (8086:7d55)", "Intel NPU (8086:7d1d)")
    assert recommend(machine).reason.startswith(
        "Intel Core Ultra 7 155H with Intel GPU and NPU → openvino int4 (runs on CPU, GPU and NPU)"
    )

    names = {
        "CPU": "Intel(R) Core(TM) Ultra 7 155H",
        "GPU": "Intel(R) Arc(TM) Graphics (iGPU)",
        "NPU": "Intel(R) AI Boost",
    }
    monkeypatch.setattr(hardware, "_openvino_devices", lambda: names)
    machine = probe()
    assert (machine.intel_gpu, machine.intel_npu) == (names["GPU"], names["NPU"])


def test_probe_linux_raspberry_pi(fake_linux):
    write(fake_linux, {"proc/cpuinfo": (MACHINES / "raspberry-pi-4.cpuinfo").read_text()})
    machine = probe()
    assert (machine.cpu_vendor, machine.cpu_model, machine.cpu_features) == ("ARM", "Cortex-A72", ["NEON"])
    assert machine.soc == "Raspberry Pi 4 Model B Rev 1.4"
    assert (machine.intel_gpu, machine.intel_npu, machine.nvidia_gpu) == ("", "", "")


def test_probe_linux_snapdragon(fake_linux):
    write(
        fake_linux,
        {
            "proc/cpuinfo": (MACHINES / "snapdragon-x-elite-linux.cpuinfo").read_text(),
            "proc/device-tree/model": "Lenovo Yoga Slim 7 14Q8X9\x00",
            "sys/devices/soc0/family": "Snapdragon\n",
            "sys/devices/soc0/machine": "X1E80100\n",
        },
    )
    machine = probe()
    assert (machine.cpu_vendor, machine.soc) == ("Qualcomm", "Snapdragon X1E80100")
    assert machine.cpu_features == ["NEON", "dotprod", "i8mm"]
    machine.arch = "aarch64"  # the probe reports this Python's real arch
    assert recommend(machine).reason.startswith("Snapdragon X1E80100 → ort-genai int4")


@pytest.mark.skipif(os.name == "nt", reason="the fake nvidia-smi is a shell script")
def test_probe_nvidia_smi_picks_the_largest_gpu(fake_linux):
    recording = (MACHINES / "two-gpu-workstation.nvidia-smi.csv").read_text()
    fake_command(fake_linux, "nvidia-smi", f"printf '%s' '{recording}'\n")
    machine = probe()
    assert (machine.nvidia_gpu, machine.nvidia_memory_gib) == ("NVIDIA GeForce RTX 4090", 24.0)


def test_probe_never_raises(fake_linux, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unreadable")

    monkeypatch.setattr(hardware.psutil, "virtual_memory", broken)
    monkeypatch.setattr(hardware, "_read", broken)
    monkeypatch.setattr(hardware, "_run", broken)
    machine = probe()
    assert machine.os == "Linux"
    assert (machine.ram_gib, machine.cpu_model, machine.cpu_features) == (None, "", [])
    assert recommend(machine).target == "gguf"
    assert describe(machine)


def fake_command(root: Path, name: str, script: str) -> None:
    """A command on the fake PATH (the fixture's bin folder beside root) that runs a shell script."""
    path = root.parent / "bin" / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.skipif(os.name == "nt", reason="the fake sysctl is a shell script")
def test_probe_macos_reads_sysctl(fake_linux, monkeypatch):
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    recording = (MACHINES / "apple-m3.sysctl.txt").read_text()
    fake_command(fake_linux, "sysctl", f"if [ \"$1\" = -n ]; then echo 0; exit 0; fi\nprintf '%s' '{recording}'\n")
    machine = probe()
    assert (machine.cpu_vendor, machine.cpu_model) == ("Apple", "Apple M3")
    assert machine.cpu_features == ["NEON", "dotprod", "i8mm"]
    assert machine.apple_silicon


@pytest.mark.skipif(os.name == "nt", reason="fakes the Windows-only modules on another system")
def test_probe_windows_reads_registry_features_and_devices(fake_linux, monkeypatch):
    class Registry:
        HKEY_LOCAL_MACHINE = "HKLM"

        @staticmethod
        def OpenKey(hive, path):
            return contextlib.nullcontext(path)

        @staticmethod
        def QueryValueEx(key, name):
            values = {"ProcessorNameString": "Intel(R) Core(TM) Ultra 7 155H  ", "VendorIdentifier": "GenuineIntel"}
            return values[name], 1

    monkeypatch.setattr(hardware.platform, "system", lambda: "Windows")
    monkeypatch.setitem(sys.modules, "winreg", Registry)
    kernel32 = types.SimpleNamespace(IsProcessorFeaturePresent=lambda pf: pf in (40, 39))
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    fake_command(fake_linux, "powershell", "printf 'Intel(R) Arc(TM) Graphics\\nIntel(R) AI Boost\\n'\n")
    machine = probe()
    assert (machine.cpu_vendor, machine.cpu_model, machine.cpu_features) == (
        "Intel",
        "Intel(R) Core(TM) Ultra 7 155H",
        ["AVX2"],
    )
    assert (machine.intel_gpu, machine.intel_npu) == ("Intel(R) Arc(TM) Graphics", "Intel(R) AI Boost")
    assert recommend(machine).reason.startswith("Intel Core Ultra 7 155H with Arc GPU and NPU → openvino int4")
