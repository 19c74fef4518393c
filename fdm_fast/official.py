"""Official EDM / FDM snapshots (``network-snapshot-*.pkl``), read without running any of their code.

The official code pickles whole modules through EDM's ``torch_utils.persistence``: unpickling them the
usual way executes the source code stored in the file. ``load_official`` reads them with a restricted
unpickler instead: only the globals such a file legitimately references are accepted (the persistence
reconstructor, tensor and storage rebuilding, ``OrderedDict``, ``ModuleDict``, ``dnnlib.EasyDict``,
numeric numpy scalars); each persistent object becomes an inert record of its class name and state,
its stored source is never compiled. Anything else is refused with an error naming the global.
From the records, ``to_fdm_fast`` builds an fdm_fast config and state dict:

- preconditionings: VPPrecond, VEPrecond, EDMPrecond, FDM_VPPrecond, FDM_VEPrecond, FDM_EDMPrecond;
- networks: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM, EDM's ImageNet-64 network).

Pitfalls handled (measured against the official code): ``FDM_VEPrecond`` ignores ``fdm_multiplier``
(every official FDM-VE model is m = 1); an ``FDM_EDMPrecond`` built without the argument is m = 1 (the
class default; fdm_fast's ``fdm_edm`` default is 2); the official VP ``sigma_min``/``sigma_max`` are
float32 values and are kept, so a converted model reproduces the official outputs.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np
import torch

PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm", "FDM_VPPrecond": "fdm_vp",
            "FDM_VEPrecond": "fdm_ve", "FDM_EDMPrecond": "fdm_edm"}


class OfficialFormatError(ValueError):
    """An official snapshot that cannot be read safely or mapped to fdm_fast."""


class Record:
    """An official object, inert: its class name and pickled state (never its code)."""

    def __init__(self, class_name: str, state: Any, module: str = ""):
        self.class_name, self.state, self.module = class_name, state, module

    def __setstate__(self, state):  # NEWOBJ + BUILD (plain torch modules such as ModuleDict)
        self.state = state

    def __repr__(self):
        return f"Record({self.class_name})"


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise OfficialFormatError("torch_utils.persistence: expected a persistent class record "
                                  "(type 'class', class_name, state)")
    return Record(meta["class_name"], meta.get("state"))


class _ModuleDict(Record):
    def __init__(self, *a, **k):
        super().__init__("ModuleDict", None, "torch.nn")


class _EasyDict(dict):
    pass


def _load_storage(data: bytes):
    # torch.storage._load_from_bytes would call torch.load(weights_only=False): read it safely instead
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc?":
        raise OfficialFormatError(f"numpy scalar of dtype {dtype!r}: only numeric scalars are accepted")
    return np.frombuffer(data, dtype=dtype)[0] if data is not None else dtype.type()


ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDict,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = ALLOWED.get((module, name))
        if fn is None:
            raise OfficialFormatError(f"refused to load the global {module}.{name}: an official EDM/FDM snapshot "
                                      "does not need it, and loading it could run code")
        return fn

    def persistent_load(self, pid):
        raise OfficialFormatError(f"refused a persistent id {pid!r}: not used by official snapshots")


def is_zip_archive(path) -> bool:
    """Whether the file at ``path`` begins as a zip archive does: torch.save's format, which fdm_fast's own
    snapshots use and no official EDM/FDM pickle does."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_official(path) -> dict:
    """The top-level dict of an official snapshot (``ema``, ``loss_fn``, ...), objects as Records."""
    if is_zip_archive(path):
        raise OfficialFormatError(f"{path}: a zip archive (torch.save's format, as fdm_fast's own snapshots "
                                  "are), not an official EDM/FDM pickle")
    with open(path, "rb") as f:
        try:
            data = _Unpickler(f).load()
        except OfficialFormatError as e:
            raise OfficialFormatError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise OfficialFormatError(f"{path}: not a readable official snapshot ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record):
        raise OfficialFormatError(f"{path}: expected an official network snapshot (a dict with 'ema')")
    return data


def _module_tensors(rec: Record, prefix: str, out: dict) -> None:
    state = rec.state or {}
    skip = set(state.get("_non_persistent_buffers_set", ()))
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{name}.", out)


def _kwargs(rec: Record) -> dict:
    kw = dict((rec.state or {}).get("_init_kwargs") or {})
    if (rec.state or {}).get("_init_args"):
        raise OfficialFormatError(f"{rec.class_name}: positional constructor arguments are not supported")
    return kw


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def to_fdm_fast(data: dict) -> tuple[dict, dict]:
    """(config, state dict) of fdm_fast's Denoiser for an official snapshot's ``ema`` module."""
    net = data["ema"]
    if net.class_name not in PRECONDS:
        raise OfficialFormatError(f"ema: {net.class_name} is not one of the official preconditionings "
                                  f"({', '.join(PRECONDS)})")
    kw = _kwargs(net)
    st = net.state or {}
    model = (st.get("_modules") or {}).get("model")
    if not isinstance(model, Record):
        raise OfficialFormatError(f"ema: {net.class_name} has no 'model' submodule")
    if model.class_name not in ("SongUNet", "DhariwalUNet"):
        raise OfficialFormatError(f"the network is {model.class_name}: only SongUNet and DhariwalUNet convert")
    name = PRECONDS[net.class_name]
    options = {}
    attrs = {k: _plain(st[k]) for k in ("sigma_min", "sigma_max", "sigma_data", "beta_d", "beta_min", "M",
                                        "epsilon_t") if k in st}
    if name in ("vp", "fdm_vp"):
        options.update({k: float(attrs[k]) for k in ("sigma_min", "sigma_max", "beta_d", "beta_min") if k in attrs})
        options.update({k: type(v)(attrs[k]) for k, v in (("M", 1), ("epsilon_t", 1.0)) if k in attrs})
    elif name in ("ve", "fdm_ve"):
        options.update({k: float(attrs[k]) for k in ("sigma_min", "sigma_max") if k in attrs})
    else:
        options.update({k: float(attrs[k]) for k in ("sigma_min", "sigma_max", "sigma_data") if k in attrs})
    # EDM's EDMPrecond defaults to the range [0, inf) (no clipping); fdm_fast needs a finite range and
    # keeps its own (0.002, 80: EDM's sampler defaults), which only the sampler's clipping reads
    if not 0 < options.get("sigma_min", 1.0) < float("inf"):
        options.pop("sigma_min")
    if not 0 < options.get("sigma_max", 1.0) < float("inf"):
        options.pop("sigma_max")
    if name == "fdm_ve":
        options["fdm_multiplier"] = 1.0  # the official FDM_VEPrecond ignores the multiplier
    elif name.startswith("fdm_"):
        # the module's own value (the class default, 1, when the constructor was not given one)
        options["fdm_multiplier"] = float(_plain(st.get("fdm_multiplier", kw.get("fdm_multiplier", 1.0))))
    if name.startswith("fdm_"):
        options.update({f: float(_plain(st[f])) for f in ("fdm_beta_min", "fdm_beta_d") if f in st})
    mk = _kwargs(model)
    embedding = mk.get("embedding_type", "positional")
    keys = ("model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
            "label_dropout")
    if model.class_name == "SongUNet":
        keys += ("embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter")
    network = {k: _plain(mk[k]) for k in keys if k in mk}
    for k in ("channel_mult", "attn_resolutions", "resample_filter"):
        if k in network:
            network[k] = tuple(network[k])
    arch = "adm" if model.class_name == "DhariwalUNet" else "ncsnpp" if embedding == "fourier" else "ddpmpp"
    config = dict(precond=name, precond_options=options, arch=arch,
                  img_resolution=int(mk.get("img_resolution", kw.get("img_resolution"))),
                  img_channels=int(kw.get("img_channels", mk.get("in_channels"))),
                  label_dim=int(mk.get("label_dim", 0)), augment_dim=int(mk.get("augment_dim", 0)), network=network,
                  source=dict(format="official", precond_class=net.class_name))
    state: dict = {}
    _module_tensors(model, "model.", state)
    return config, state


def load_official_denoiser(path, device="cpu"):
    """An fdm_fast Denoiser with an official snapshot's EMA weights (nothing from the file is run)."""
    from .nn import build_denoiser

    config, state = to_fdm_fast(load_official(path))
    net = build_denoiser(config)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OfficialFormatError(f"{path}: the weights do not map onto fdm_fast's {config['arch']} network "
                                  f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return net.eval().requires_grad_(False).to(device)


# ------------------------------------------------------------------------------------------------
# safetensors, written and read here (the format is a JSON header and raw little-endian tensors;
# https://github.com/huggingface/safetensors), so no extra package is needed for the hub's format.

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors: dict, path: str, metadata: dict = None) -> None:
    import json
    import os
    import struct

    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name here")
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = dict(dtype=_ST_DTYPES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_safetensors(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file."""
    import json
    import struct

    back = {v: k for k, v in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise OfficialFormatError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise OfficialFormatError(f"{path}: not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", {}) or {}
    out, base = {}, 8 + n
    for name, h in header.items():
        a, b = h["data_offsets"]
        if h["dtype"] not in back or not 0 <= a <= b <= len(data) - base:
            raise OfficialFormatError(f"{path}: tensor {name} has a bad dtype or offsets")
        buf = bytearray(data[base + a:base + b])
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(back[h["dtype"]]).reshape(h["shape"]).clone()
    return out, meta
