"""Split the model over several devices for inference (a device map).

The decoder layers are divided over the devices in contiguous runs; everything that builds the decoder's input
(token embedding, ViT, connector, latent bridges in, position tables, RoPE, and the VAE) sits on the device of the
first layer, and everything that reads its output (final norms, ``lm_head``, ``llm2vae``, the detection head,
the DIGA projector) on the device of the last layer. A tied ``lm_head`` stays with the token embedding it shares.

How the forward crosses devices: the placement is explicit. Each module is moved to its device here, and the
decoder's layer loop (``MoTDecoder.forward``, when ``layer_devices`` is set) moves the residual stream, the expert
routing indexes and the RoPE tables to each layer's device; the cached forward keeps each layer's KV cache on
that layer's device and copies its attention indexes and mask once per device. accelerate's ``dispatch_model``
was not used: its hooks move only a module's ``forward`` arguments, while the cached forward writes and reads
the KV cache from an attention callback inside each layer and the final norm splits the stream with the routing
indexes outside any layer, so the cache entries, the attention plan and the routing would still have crossed
devices unhooked. Moving them explicitly keeps every transfer in two visible places.

Map forms (``device_map``):

* ``auto`` (or its synonym ``balanced``): the layers over every visible GPU, balanced by bytes (parameters and
  buffers) including the input modules on the first GPU and the output modules on the last; with one GPU it is
  that GPU, without one the CPU. ``max_memory`` caps the weight bytes per device (``"0:20GiB,1:40GiB"``);
  devices without a cap are limited by their total memory.
* explicit layer ranges: ``"0:0-13,1:14-27"``, comma-separated ``DEVICE:FIRST-LAST`` (or ``DEVICE:LAYER``) where
  DEVICE is a GPU index, ``cuda:N`` or ``cpu``. Every decoder layer must be named exactly once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from unigendet.config.loader import ConfigError

logger = logging.getLogger(__name__)

AUTO_MAPS = ("auto", "balanced")
CPU_DEVICE = torch.device("cpu")
LAYER_PREFIX = "language_model.model.layers."
# Modules that read the decoder's output: they sit on the last layer's device.
OUTPUT_MODULES = ("language_model.model.norm", "language_model.model.norm_moe_gen", "language_model.lm_head",
                  "llm2vae", "detection_head", "diga_projector")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


# --------------------------------------------------------------------------------------------------
# Spelling: devices, layer ranges, memory sizes


def parse_device(text: str, key: str = "device_map") -> torch.device:
    """``3`` -> cuda:3, ``cuda:3``, ``cpu``; a ConfigError naming ``key`` for anything else."""
    word = text.strip().lower()
    if word.isdigit():
        return torch.device("cuda", int(word))
    if word == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda:(\d+)", word)
    if match:
        return torch.device("cuda", int(match.group(1)))
    raise ConfigError(f"{key}: unknown device {text.strip()!r} (a GPU index, cuda:N or cpu)")


def require_visible(devices: Sequence[torch.device], key: str = "device_map", gpu_count: int | None = None) -> None:
    """ConfigError naming ``key`` when a CUDA device's index is not a visible GPU."""
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    for device in devices:
        if device.type == "cuda" and device.index >= count:
            raise ConfigError(f"{key}: {device} is not a visible device ({count} CUDA device(s) visible)")


def parse_layer_ranges(text: str) -> list[tuple[torch.device, int, int]]:
    """``"0:0-13,1:14-27"`` -> ``[(cuda:0, 0, 13), (cuda:1, 14, 27)]`` (inclusive ranges), overlaps refused."""
    entries = []
    for part in text.split(","):
        device_text, sep, span = part.strip().rpartition(":")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", span.strip())
        if not sep or not device_text or not match:
            raise ConfigError(f"device_map: {part.strip()!r} is not DEVICE:FIRST-LAST (e.g. \"0:0-13,1:14-27\"), "
                              "auto or balanced")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ConfigError(f"device_map: range {span.strip()!r} ends before it starts")
        entries.append((parse_device(device_text), first, last))
    owner: dict[int, torch.device] = {}
    for device, first, last in entries:
        for layer in range(first, last + 1):
            if layer in owner:
                raise ConfigError(f"device_map: layer {layer} is assigned twice ({owner[layer]} and {device})")
            owner[layer] = device
    return entries


def parse_size(text: str, key: str = "max_memory") -> int:
    """``"20GiB"``, ``"1.5GB"``, ``"512MiB"`` or a plain byte count -> bytes."""
    match = _SIZE.match(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"{key}: {text.strip()!r} is not a size (e.g. 20GiB, 1.5GB, 512MiB or bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_max_memory(text: str) -> dict[torch.device, int]:
    """``"0:20GiB,1:40GiB"`` -> ``{cuda:0: 20 GiB, cuda:1: 40 GiB}`` (weight bytes allowed per device)."""
    limits: dict[torch.device, int] = {}
    for part in text.split(","):
        device_text, sep, size = part.strip().rpartition(":")
        if not sep or not device_text:
            raise ConfigError(f"max_memory: {part.strip()!r} is not DEVICE:SIZE (e.g. \"0:20GiB,1:40GiB\")")
        device = parse_device(device_text, "max_memory")
        if device in limits:
            raise ConfigError(f"max_memory: {device} is given twice")
        limits[device] = parse_size(size)
    return limits


def check_device_map(device_map: str, max_memory: str | None = None, device: str | None = None,
                     gpu_count: int | None = None) -> None:
    """Everything about a ``device_map`` setting that can be checked before the model is read: its spelling, that
    its devices are visible, that ``max_memory`` goes with a balanced map only, and that a single ``device`` agrees
    with the map's input device. ConfigError naming the key."""
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if device_map.strip().lower() in AUTO_MAPS:
        limits = parse_max_memory(max_memory) if max_memory else {}
        require_visible(list(limits), "max_memory", count)
        if count and CPU_DEVICE in limits:
            raise ConfigError("max_memory: cpu is not one of the devices auto balances over (the visible GPUs)")
    else:
        if max_memory:
            raise ConfigError("max_memory applies to device_map auto/balanced only (explicit ranges fix the split)")
        require_visible([d for d, _, _ in parse_layer_ranges(device_map)], "device_map", count)
    inputs = input_device(device_map, count)
    try:
        single = None if device is None else torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a device (cpu, cuda or cuda:N)") from None
    if single is not None and not _agrees(single, inputs):
        raise ConfigError(f"device: {device!r} disagrees with device_map {device_map!r}, whose input device is "
                          f"{inputs}; drop device or set it to {inputs}")


def input_device(device_map: str, gpu_count: int | None = None) -> torch.device:
    """Where a map puts the input modules (and so where inputs and outputs of the model live): the first GPU for a
    balanced map (the CPU without GPUs), the device of the lowest layer named for explicit ranges."""
    if device_map.strip().lower() in AUTO_MAPS:
        count = torch.cuda.device_count() if gpu_count is None else gpu_count
        return torch.device("cuda", 0) if count else torch.device("cpu")
    return min(parse_layer_ranges(device_map), key=lambda entry: entry[1])[0]


def _agrees(single: torch.device, inputs: torch.device) -> bool:
    return single.type == inputs.type and (single.index is None or single.index == (inputs.index or 0))


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class DevicePlan:
    """Where every module goes: ``layer_devices[i]`` for decoder layer i, input modules (and the VAE) on
    ``input_device``, output modules on ``output_device`` (by default the first and the last layer's devices)."""

    layer_devices: tuple[torch.device, ...]
    input_device: torch.device | None = None
    output_device: torch.device | None = None

    def __post_init__(self) -> None:
        if not self.layer_devices:
            raise ValueError("a device plan needs at least one layer")
        if self.input_device is None:
            object.__setattr__(self, "input_device", self.layer_devices[0])
        if self.output_device is None:
            object.__setattr__(self, "output_device", self.layer_devices[-1])

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, inputs first, then in layer order, outputs last."""
        return list(dict.fromkeys((self.input_device, *self.layer_devices, self.output_device)))

    def device_of(self, module_name: str) -> torch.device:
        group = module_group(module_name)
        if group == "input":
            return self.input_device
        if group == "output":
            return self.output_device
        return self.layer_devices[group]

    def describe(self) -> str:
        """``cuda:0 layers 0-13, cuda:1 layers 14-27`` (runs of consecutive layers)."""
        runs: list[list] = []
        for i, device in enumerate(self.layer_devices):
            if runs and runs[-1][0] == device:
                runs[-1][2] = i
            else:
                runs.append([device, i, i])
        return ", ".join(f"{d} layers {a}-{b}" if a != b else f"{d} layer {a}" for d, a, b in runs)


def module_group(module_name: str) -> str | int:
    """``"input"``, ``"output"`` or the decoder layer index that ``module_name`` belongs to."""
    if module_name.startswith(LAYER_PREFIX):
        return int(module_name[len(LAYER_PREFIX):].split(".", 1)[0])
    if any(module_name == name or module_name.startswith(name + ".") for name in OUTPUT_MODULES):
        return "output"
    return "input"


def _tensors_by_module(model: nn.Module):
    """(module name, module, kind, tensor name, tensor) for every parameter and buffer, each tensor once (a tied
    weight belongs to the first module that holds it: the token embedding before ``lm_head``)."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for tensor_name, tensor in tensors.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield name, module, kind, tensor_name, tensor


def group_bytes(model: nn.Module, vae: nn.Module | None = None) -> tuple[int, int, list[int]]:
    """(input bytes incl. the VAE, output bytes, bytes per decoder layer) of the model as it is (its dtypes;
    a meta-device model works too)."""
    num_layers = len(model.language_model.model.layers)
    inputs, outputs, layers = 0, 0, [0] * num_layers
    for name, _, _, _, tensor in _tensors_by_module(model):
        size = tensor.numel() * tensor.element_size()
        group = module_group(name)
        if group == "input":
            inputs += size
        elif group == "output":
            outputs += size
        else:
            layers[group] += size
    if vae is not None:
        inputs += sum(t.numel() * t.element_size() for t in (*vae.parameters(), *vae.buffers()))
    return inputs, outputs, layers


def balance_layers(layer_bytes: Sequence[int], devices: Sequence[torch.device], input_bytes: int = 0,
                   output_bytes: int = 0, capacities: Sequence[int] | None = None) -> tuple[torch.device, ...]:
    """The device of each layer: contiguous runs over ``devices`` in order, the first device also holding
    ``input_bytes`` and the last ``output_bytes``, minimising the largest share of a device's capacity that is used
    (without capacities: the largest byte count on a device). Exact (dynamic programming over split points).
    ConfigError naming ``max_memory`` when even the best split exceeds a capacity."""
    if not devices:
        raise ConfigError("device_map: no device to place the model on")
    if capacities is not None and len(capacities) != len(devices):
        raise ValueError(f"{len(capacities)} capacities for {len(devices)} devices")
    k, n = len(devices), len(layer_bytes)
    caps = [float(c) for c in capacities] if capacities is not None else [1.0] * k
    fixed = [0] * k
    fixed[0] += input_bytes
    fixed[-1] += output_bytes
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def load(d: int, start: int, stop: int) -> float:
        return (fixed[d] + prefix[stop] - prefix[start]) / caps[d]

    # best[d][i]: the smallest achievable maximum load placing layers [0, i) on devices 0..d; cut[d][i] the first
    # layer of device d in that placement.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for i in range(n + 1):
        best[0][i] = load(0, 0, i)
    for d in range(1, k):
        for i in range(n + 1):
            for j in range(i + 1):
                value = max(best[d - 1][j], load(d, j, i))
                if value < best[d][i]:
                    best[d][i], cut[d][i] = value, j
    placement: list[torch.device] = [devices[0]] * n
    stop = n
    for d in range(k - 1, 0, -1):
        start = cut[d][stop]
        placement[start:stop] = [devices[d]] * (stop - start)
        stop = start
    if capacities is not None and best[k - 1][n] > 1.0:
        total = input_bytes + output_bytes + prefix[-1]
        raise ConfigError(f"max_memory: the weights ({total / 2**30:.2f} GiB) do not fit on {', '.join(map(str, devices))} "
                          f"within {', '.join(f'{c / 2**30:.2f} GiB' for c in caps)}")
    return tuple(placement)


def visible_gpus() -> list[torch.device]:
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _total_memory(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def plan_device_map(model: nn.Module, vae: nn.Module | None, device_map: str,
                    max_memory: str | Mapping[torch.device, int] | None = None,
                    devices: Sequence[torch.device] | None = None) -> DevicePlan:
    """The :class:`DevicePlan` of ``device_map`` for ``model`` (and ``vae``, placed with the inputs).

    ``auto`` / ``balanced`` balance over ``devices`` (default: the visible GPUs; the CPU when there is none) by the
    model's parameter and buffer bytes as loaded, within ``max_memory`` (``"0:20GiB,1:40GiB"`` or a mapping; devices
    without a limit get their total memory when it is known); an explicit ``"0:0-13,1:14-27"`` is checked against
    the model's layer count."""
    num_layers = len(model.language_model.model.layers)
    if device_map.strip().lower() not in AUTO_MAPS:
        if max_memory:
            raise ConfigError("max_memory applies to device_map auto/balanced only (explicit ranges fix the split)")
        entries = parse_layer_ranges(device_map)
        require_visible([d for d, _, _ in entries])
        owner = {layer: d for d, first, last in entries for layer in range(first, last + 1)}
        beyond = sorted(layer for layer in owner if layer >= num_layers)
        if beyond:
            raise ConfigError(f"device_map: layer {beyond[0]} does not exist (the model has {num_layers} decoder layers)")
        missing = [layer for layer in range(num_layers) if layer not in owner]
        if missing:
            raise ConfigError(f"device_map: layer(s) {', '.join(map(str, missing))} are on no device (the model has "
                              f"{num_layers} decoder layers, each must be named once)")
        return DevicePlan(tuple(owner[layer] for layer in range(num_layers)))
    devices = list(devices) if devices is not None else (visible_gpus() or [torch.device("cpu")])
    limits = parse_max_memory(max_memory) if isinstance(max_memory, str) else dict(max_memory or {})
    unknown = [str(d) for d in limits if d not in devices]
    if unknown:
        raise ConfigError(f"max_memory: {', '.join(unknown)} is not one of the devices the map balances over "
                          f"({', '.join(map(str, devices))})")
    capacities = None
    if limits or any(_total_memory(d) for d in devices):
        capacities = [limits.get(d) or _total_memory(d) for d in devices]
        if any(c is None for c in capacities):
            raise ConfigError(f"max_memory: give a limit for every device ({', '.join(map(str, devices))}) when some "
                              "have no known total memory")
    inputs, outputs, layers = group_bytes(model, vae)
    return DevicePlan(balance_layers(layers, devices, inputs, outputs, capacities), devices[0], devices[-1])


def plan_bytes(model: nn.Module, vae: nn.Module | None, plan: DevicePlan) -> dict[torch.device, int]:
    """Weight bytes (parameters and buffers) each device of ``plan`` will hold."""
    inputs, outputs, layers = group_bytes(model, vae)
    totals = dict.fromkeys(plan.devices, 0)
    totals[plan.input_device] += inputs
    totals[plan.output_device] += outputs
    for device, size in zip(plan.layer_devices, layers):
        totals[device] += size
    return totals


def apply_device_map(model: nn.Module, vae: nn.Module | None, plan: DevicePlan) -> None:
    """Move every parameter and buffer of ``model`` to its device under ``plan`` (directly from where it is: the
    whole model never passes through one device), the VAE to the input device, and tell the decoder its layers'
    devices so that its forward moves the stream along."""
    decoder = model.language_model.model
    if len(plan.layer_devices) != len(decoder.layers):
        raise ValueError(f"the plan places {len(plan.layer_devices)} layers, the model has {len(decoder.layers)}")
    for name, module, kind, tensor_name, tensor in _tensors_by_module(model):
        device = plan.device_of(name)
        if kind == "param":
            tensor.data = tensor.data.to(device)
        else:
            module._buffers[tensor_name] = tensor.to(device)
    if vae is not None:
        vae.to(plan.input_device)
    decoder.layer_devices = list(plan.layer_devices)
    sizes = plan_bytes(model, vae, plan)
    logger.info("device map: %s; inputs on %s, outputs on %s; weights %s", plan.describe(), plan.input_device,
                plan.output_device, ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in sizes.items()))


def dispatch(model: nn.Module, vae: nn.Module | None, device_map: str,
             max_memory: str | Mapping[torch.device, int] | None = None,
             devices: Sequence[torch.device] | None = None) -> DevicePlan:
    """Plan ``device_map`` for ``model`` and apply it (see :func:`plan_device_map` and :func:`apply_device_map`)."""
    plan = plan_device_map(model, vae, device_map, max_memory, devices)
    apply_device_map(model, vae, plan)
    return plan


__all__ = ["AUTO_MAPS", "DevicePlan", "apply_device_map", "balance_layers", "check_device_map", "dispatch",
           "group_bytes", "input_device", "parse_layer_ranges", "parse_max_memory", "plan_bytes", "plan_device_map"]
