"""Models larger than one device: ``--device-map`` / ``--max-memory`` / ``--offload-folder`` as
``from_pretrained`` keyword arguments (accelerate places the layers: GPUs, then CPU RAM, then disk), and the two
things a split model changes for us: where inputs go (:func:`input_device`) and reading a weight that lives on
disk (:func:`param_value`).

``--device-map``: ``auto`` | ``balanced`` | ``balanced_low_0`` | ``sequential`` | one device (``cpu``,
``cuda:0``) | a JSON object ``{"module name": device}`` (devices: an int GPU index, ``cpu``, ``disk``), inline or
in a ``.json`` file. ``--max-memory``: ``cpu=2GiB,0=10GiB,disk=50GB`` (keys: GPU index, cpu, mps, disk;
values: sizes accelerate understands, or bytes); alone it implies ``--device-map auto``. Offloaded weights go to
``--offload-folder`` (default: a temp folder removed at exit; transformers reads safetensors checkpoints in place).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from plans.errors import CompressError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_MEMORY_KEYS = ("cpu", "mps", "disk")
DEVICE_MAP_HELP = ("split the model across devices (accelerate): auto | balanced | sequential | cpu | cuda:0 | "
                   "JSON {module: device} (inline or a .json file; devices: GPU index, cpu, disk)")
MAX_MEMORY_HELP = "per-device memory for --device-map, e.g. cpu=2GiB,0=10GiB (implies --device-map auto)"
OFFLOAD_HELP = "folder for weights offloaded to disk (default: a temp folder)"


def parse_device_map(text: str | None):
    """None, a strategy / device string, or a {module: device} dict."""
    if isinstance(text, dict):
        text = json.dumps(text)
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{") or text.endswith(".json"):
        raw = text
        if not text.startswith("{"):
            try:
                raw = Path(text).read_text()
            except OSError as e:
                raise CompressError(f"--device-map {text}: cannot read it ({e.strerror})") from None
        try:
            dm = json.loads(raw)
        except ValueError as e:
            raise CompressError(f"--device-map is not valid JSON ({e})") from None
        if not isinstance(dm, dict) or not dm:
            raise CompressError("--device-map JSON must be a non-empty object {\"module name\": device}")
        for k, v in dm.items():
            if not (isinstance(v, int) and not isinstance(v, bool)) and not isinstance(v, str):
                raise CompressError(f"--device-map: device of {k!r} must be a GPU index, 'cpu' or 'disk', got {v!r}")
        return dm
    try:
        import torch

        torch.device(text)
    except (RuntimeError, ValueError):
        raise CompressError(f"--device-map {text!r}: use one of {', '.join(STRATEGIES)}, a device (cpu, cuda:0) "
                            "or a JSON object {module: device}") from None
    return text


def parse_max_memory(text: str | None) -> dict | None:
    """``cpu=2GiB,0=10GiB`` -> {"cpu": "2GiB", 0: "10GiB"}, every size checked."""
    if isinstance(text, dict):
        text = ",".join(f"{k}={v}" for k, v in text.items())
    if text is None or not str(text).strip():
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        key, sep, size = part.partition("=")
        if not sep or not key or not size:
            raise CompressError(f"--max-memory entry {part!r}: use DEVICE=SIZE, e.g. cpu=2GiB,0=10GiB")
        if key.isdigit():
            key = int(key)
        elif key not in _MEMORY_KEYS:
            raise CompressError(f"--max-memory device {key!r}: use a GPU index or one of {', '.join(_MEMORY_KEYS)}")
        value = int(size) if size.isdigit() else size
        try:
            if convert_file_size_to_int(value) < 0:
                raise ValueError
        except (ValueError, TypeError):
            raise CompressError(f"--max-memory size {size!r} for {key}: use e.g. 500MB, 2GiB or a number of bytes") \
                from None
        out[key] = value
    return out or None


def _temp_offload_folder() -> str:
    d = tempfile.mkdtemp(prefix="compress-offload-")
    atexit.register(shutil.rmtree, d, True)
    return d


def placement_kwargs(device_map: str | dict | None = None, max_memory: str | dict | None = None,
                     offload_folder: str | Path | None = None) -> dict:
    """The keyword arguments of :func:`compressor.models.load_model` for these options, as the CLI's text or
    already parsed ({} when none)."""
    dm, mm = parse_device_map(device_map), parse_max_memory(max_memory)
    if dm is None and mm is None:
        if offload_folder is not None:
            raise CompressError("--offload-folder needs --device-map (or --max-memory)")
        return {}
    if dm is None:
        dm = "auto"
    return {"device_map": dm, "max_memory": mm,
            "offload_folder": str(offload_folder) if offload_folder else _temp_offload_folder()}


def input_device(model):
    """Where the model's input ids go: the execution device of its input embeddings (a module offloaded to disk
    by accelerate has its weights on the meta device but computes on its hook's execution device)."""
    import torch

    emb = model.get_input_embeddings()
    dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if dev is None:
        return emb.weight.device
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def param_value(model, name: str, p):
    """The value of parameter ``name`` (``p``), read from accelerate's offload map when it is on the meta device."""
    if p.device.type != "meta":
        return p
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    wm = getattr(getattr(mod, "_hf_hook", None), "weights_map", None)
    if wm is None:
        raise CompressError(f"parameter {name} is on the meta device with no offloaded copy to read")
    return wm[pname]
