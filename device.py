"""
The device a command runs on, and the GPU's peak (the MFU denominator): what every command checks
before any work.
"""
import torch


def pick_device(name):
    """"auto" -> the GPU when there is one, else the CPU; any other name as torch spells it."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_problem(name):
    """Why a --device value cannot be used here (None if it can): what the commands check before any work."""
    try:
        device = pick_device(name)
    except RuntimeError:
        return f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU here"
    return None


def peak_flops(device, tflops=0.0):
    """Dense bf16 tensor-core peak FLOP/s of the GPU (the MFU denominator); None on CPU or if unknown."""
    if tflops or device.type != "cuda":
        return tflops * 1e12 or None
    name = torch.cuda.get_device_name(device)
    table = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121))
    return next((t * 1e12 for key, t in table if key in name), None)
