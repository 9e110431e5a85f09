#!/usr/bin/env python3
"""Reference PyTorch module for the repro weights files (fi-RevNet and the small CNN).

Builds the model from a weights file alone: the architecture, the input encoding, the
latent order and the channel permutations are read from the file's safetensors metadata
(schema ``repro-weights/1``, written by src/nn/describe.rs), and the tensors are loaded
with ``load_state_dict(strict=True)``. Needs only ``torch`` (no numpy, no safetensors
package: both file formats are read here).

    import sys; sys.path.insert(0, "python")
    import repro_torch
    model = repro_torch.load("out/weights.safetensors")      # eval mode
    images = repro_torch.read_npy("mnist/test_images.npy")   # uint8 (N, 28, 28)
    z, scores = model(images[:100])                          # fi-RevNet: latent and class scores
    x = model.inverse(z)                                     # fi-RevNet: back to the input

For the CNN, ``model(images)`` returns the logits. ``model.encode(images)`` is the input
encoding (u8 pixels -> the float input the model takes), ``model.decode(x)`` maps an input
back to pixel values k/256 of the digit.

As a program, it evaluates a weights file on images and writes its outputs:

    python python/repro_torch.py WEIGHTS IMAGES.npy [--labels LABELS.npy] [--limit N] [--out DIR]

prints one JSON object (model, n, errors, error_percent, and for a fi-RevNet the largest
|inverse(forward(x)) - x| in float32 and in float64) and, with --out, writes DIR/scores.npy (N, classes) and for a
fi-RevNet DIR/z.npy (N, D), float32.
"""

import argparse
import ast
import copy
import json
import struct
import sys
import warnings

# A plain `pip install torch` venv has no NumPy; torch warns about it on import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCHEMA = "repro-weights/1"

# --------------------------------------------------------------------------------------
# Files: safetensors and .npy, read and written without extra packages
# --------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64, "U8": torch.uint8, "I64": torch.int64}


def read_safetensors(path):
    """(tensors by name, metadata dict of strings) of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).clone()
    return tensors, metadata


_NPY_DTYPES = {"|u1": torch.uint8, "<f4": torch.float32, "<f8": torch.float64,
               "<i8": torch.int64, "<i4": torch.int32}


def read_npy(path):
    """A C-order .npy file as a tensor."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"{path} is not a .npy file")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    header = ast.literal_eval(data[start:start + hlen].decode("latin1"))
    if header["fortran_order"]:
        raise ValueError(f"{path}: Fortran order is not supported")
    dtype = _NPY_DTYPES[header["descr"]]
    flat = torch.frombuffer(bytearray(data[start + hlen:]), dtype=dtype)
    return flat.reshape(header["shape"]).clone()


def write_npy(path, tensor):
    """Writes a float32 tensor as a C-order .npy file (format 1.0)."""
    t = tensor.detach().to(torch.float32).contiguous().cpu()
    shape = tuple(t.shape)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % (
        "(%d,)" % shape[0] if len(shape) == 1 else str(shape))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(t.numpy().tobytes() if _has_numpy() else _f32_bytes(t))


def _has_numpy():
    try:
        import numpy  # noqa: F401
        return True
    except ImportError:
        return False


def _f32_bytes(t):
    return struct.pack("<%df" % t.numel(), *t.reshape(-1).tolist())


# --------------------------------------------------------------------------------------
# Input encoding (metadata `input`)
# --------------------------------------------------------------------------------------

def encode(images, spec):
    """uint8 images (N, 28, 28) -> model input (N, C, S, S), float32, evaluation mode
    (no dequantisation noise): u = 0 everywhere, the digit channel's centre = k / divisor,
    then x = scale * u + shift."""
    images = torch.as_tensor(images)
    if images.dim() == 2:
        images = images.unsqueeze(0)
    c, s, _ = spec["shape"]
    pad = spec["pad"]
    n, h, w = images.shape
    u = torch.zeros(n, c, s, s, dtype=torch.float32)
    u[:, spec["digit_channel"], pad:pad + h, pad:pad + w] = images.to(torch.float32) / spec["divisor"]
    return u * spec["scale"] + spec["shift"]


def decode(x, spec):
    """Model input (N, C, S, S) -> the digit's pixel values k / divisor, (N, 28, 28)."""
    c, s, _ = spec["shape"]
    pad = spec["pad"]
    u = (x - spec["shift"]) / spec["scale"]
    return u[:, spec["digit_channel"], pad:s - pad, pad:s - pad]


# --------------------------------------------------------------------------------------
# Layers (metadata `architecture`)
# --------------------------------------------------------------------------------------

class ActNorm(nn.Module):
    """y[:, c] = (x[:, c] + bias[c]) * exp(logs[c])."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return (x + self.bias.view(1, -1, 1, 1)) * torch.exp(self.logs.view(1, -1, 1, 1))

    def inverse(self, y):
        return y * torch.exp(-self.logs.view(1, -1, 1, 1)) - self.bias.view(1, -1, 1, 1)


class ZeroConv(nn.Conv2d):
    """Glow's Conv2dZeros: conv2d, then each output channel times exp(logs_factor * logs)."""

    def __init__(self, spec, logs_factor):
        super().__init__(spec["in"], spec["out"], spec["kernel"], stride=spec["stride"],
                         padding=spec["padding"], bias=spec["bias"])
        self.logs = nn.Parameter(torch.zeros(spec["out"]))
        self.logs_factor = logs_factor

    def forward(self, x):
        return super().forward(x) * torch.exp(self.logs_factor * self.logs).view(1, -1, 1, 1)


def _conv(spec):
    return nn.Conv2d(spec["in"], spec["out"], spec["kernel"], stride=spec["stride"],
                     padding=spec["padding"], bias=spec["bias"])


class Layers(nn.Module):
    """A sequence of layer specs; the named ones are submodules under their names (so the
    state dict's keys are the weights file's tensor names)."""

    def __init__(self, specs, logs_factor=None):
        super().__init__()
        self.specs = specs
        for spec in specs:
            op = spec["op"]
            if op == "conv2d":
                self.add_module(spec["name"], _conv(spec))
            elif op == "zero_conv":
                self.add_module(spec["name"], ZeroConv(spec, logs_factor))
            elif op == "actnorm":
                self.add_module(spec["name"], ActNorm(spec["channels"]))
            elif op == "linear":
                self.add_module(spec["name"], nn.Linear(spec["in"], spec["out"], bias=spec["bias"]))
            elif op == "residual":
                self.add_module(spec["name"], Residual(spec["body"], logs_factor))
            elif op not in ("relu", "dropout", "flatten"):
                raise ValueError(f"unknown layer op {op!r}")

    def forward(self, x):
        for spec in self.specs:
            op = spec["op"]
            if op == "relu":
                x = F.relu(x)
            elif op == "dropout":
                x = F.dropout(x, spec["p"], self.training)
            elif op == "flatten":
                x = torch.flatten(x, 1)
            else:
                x = getattr(self, spec["name"])(x)
        return x


class Residual(Layers):
    """relu(x + body(x))."""

    def forward(self, x):
        return F.relu(x + super().forward(x))


# --------------------------------------------------------------------------------------
# fi-RevNet
# --------------------------------------------------------------------------------------

def squeeze2(x):
    """out[:, 4c + 2dy + dx, y, x] = in[:, c, 2y + dy, 2x + dx]."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze2(x):
    n, c4, h, w = x.shape
    x = x.view(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c4 // 4, 2 * h, 2 * w)


class FlowStep(nn.Module):
    """ActNorm -> channel permutation -> coupling (additive or affine)."""

    def __init__(self, level_spec, perm, arch):
        super().__init__()
        self.actnorm = ActNorm(level_spec["actnorm"]["channels"])
        coupling = level_spec["coupling"]
        self.coupling = Layers(coupling["net"], arch["zero_conv"]["logs_factor"])
        self.kept = coupling["x_a"][0]
        self.affine = arch["coupling"]["kind"] == "affine"
        self.offset = arch["coupling"]["affine_scale_offset"]
        perm = torch.tensor(perm, dtype=torch.long)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("perm_inverse", torch.argsort(perm), persistent=False)

    def _shift_scale(self, xa, channels_b):
        t = self.coupling(xa)
        if not self.affine:
            return t, None
        return t[:, :channels_b], torch.sigmoid(t[:, channels_b:] + self.offset)

    def forward(self, x):
        x = self.actnorm(x)[:, self.perm]
        xa, xb = x[:, :self.kept], x[:, self.kept:]
        shift, scale = self._shift_scale(xa, xb.shape[1])
        yb = xb + shift if scale is None else (xb + shift) * scale
        return torch.cat([xa, yb], 1)

    def inverse(self, y):
        ya, yb = y[:, :self.kept], y[:, self.kept:]
        shift, scale = self._shift_scale(ya, yb.shape[1])
        xb = yb - shift if scale is None else yb / scale - shift
        x = torch.cat([ya, xb], 1)[:, self.perm_inverse]
        return self.actnorm.inverse(x)


class Split(nn.Module):
    """Keeps the first half of the channels; the rest leaves the flow (its conditional
    Gaussian prior, `prior`, matters for the likelihood only)."""

    def __init__(self, spec, arch):
        super().__init__()
        self.kept = spec["kept"][0]
        self.prior = ZeroConv(spec["prior"], arch["zero_conv"]["logs_factor"])


class Level(nn.Module):
    def __init__(self, spec, permutations, arch):
        super().__init__()
        self.step_names = spec["step_names"]
        for k in self.step_names:
            self.add_module(k, FlowStep(spec, permutations[f"{spec['name']}.{k}"], arch))
        self.split = Split(spec["split"], arch) if spec["split"] is not None else None


class LogitBatchNorm(nn.Module):
    """BatchNorm1d on z_s (weight, bias, running_mean, running_var; no batch counter)."""

    def __init__(self, spec):
        super().__init__()
        k = spec["channels"]
        self.eps, self.momentum = spec["eps"], spec["momentum"]
        self.weight = nn.Parameter(torch.ones(k))
        self.bias = nn.Parameter(torch.zeros(k))
        self.register_buffer("running_mean", torch.zeros(k))
        self.register_buffer("running_var", torch.ones(k))

    def forward(self, z_s):
        return F.batch_norm(z_s, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class FiRevNet(nn.Module):
    """The fully invertible RevNet. forward(images u8) -> (z, scores); inverse(z) -> x."""

    def __init__(self, meta):
        super().__init__()
        self.input_spec = json.loads(meta["input"])
        self.arch = json.loads(meta["architecture"])
        self.latent = json.loads(meta["latent"])
        permutations = json.loads(meta["permutations"])
        self.level_names = []
        for spec in self.arch["levels"]:
            self.add_module(spec["name"], Level(spec, permutations, self.arch))
            self.level_names.append(spec["name"])
        bn = self.arch["logit_batchnorm"]
        self.logit_bn = LogitBatchNorm(bn) if bn is not None else None
        self.register_buffer("z_s_indices", torch.tensor(self.latent["z_s"]["indices"]),
                             persistent=False)

    def encode(self, images):
        return encode(images, self.input_spec)

    def decode(self, x):
        return decode(x, self.input_spec)

    def flow(self, x):
        """Encoded input (N, C, S, S) -> latent z (N, D) in the weights file's order."""
        outs = {}
        h = x
        for name in self.level_names:
            level = getattr(self, name)
            h = squeeze2(h)
            for k in level.step_names:
                h = getattr(level, k)(h)
            if level.split is not None:
                outs[f"{name}.split"] = h[:, level.split.kept:]
                h = h[:, :level.split.kept]
        outs["final"] = h
        return torch.cat([outs[b["name"]].flatten(1) for b in self.latent["blocks"]], 1)

    def inverse(self, z):
        """Latent z (N, D) -> encoded input (N, C, S, S)."""
        blocks = {}
        for b in self.latent["blocks"]:
            size = b["shape"][0] * b["shape"][1] * b["shape"][2]
            blocks[b["name"]] = z[:, b["start"]:b["start"] + size].reshape(-1, *b["shape"])
        h = blocks["final"]
        for name in reversed(self.level_names):
            level = getattr(self, name)
            if level.split is not None:
                h = torch.cat([h, blocks[f"{name}.split"]], 1)
            for k in reversed(level.step_names):
                h = getattr(level, k).inverse(h)
            h = unsqueeze2(h)
        return h

    def z_s(self, z):
        """The logits z_s (N, classes): entries of z."""
        return z[:, self.z_s_indices]

    def scores(self, z):
        z_s = self.z_s(z)
        return self.logit_bn(z_s) if self.logit_bn is not None else z_s

    def forward(self, images):
        """uint8 images (N, 28, 28) -> (z (N, D), class scores (N, classes))."""
        z = self.flow(self.encode(images))
        return z, self.scores(z)


# --------------------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------------------

class SmallCnn(Layers):
    """The small ResNet-style classifier. forward(images u8) -> logits (N, classes)."""

    def __init__(self, meta):
        arch = json.loads(meta["architecture"])
        super().__init__(arch["layers"])
        self.input_spec = json.loads(meta["input"])

    def encode(self, images):
        return encode(images, self.input_spec)

    def decode(self, x):
        return decode(x, self.input_spec)

    def forward(self, images):
        return super().forward(self.encode(images))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def build(metadata):
    """An untrained model of the architecture a weights file's metadata describes."""
    if metadata.get("schema") != SCHEMA:
        raise ValueError(f"weights metadata schema {metadata.get('schema')!r}, this module reads {SCHEMA!r}")
    kind = json.loads(metadata["architecture"])["model"]
    if kind == "firevnet":
        return FiRevNet(metadata)
    if kind == "cnn":
        return SmallCnn(metadata)
    raise ValueError(f"unknown model {kind!r}")


def load(path):
    """The model of a weights file, its tensors loaded strictly, in evaluation mode."""
    tensors, metadata = read_safetensors(path)
    model = build(metadata)
    model.load_state_dict(tensors, strict=True)
    model.metadata = metadata
    return model.eval()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("weights")
    p.add_argument("images", help="uint8 .npy (N, 28, 28)")
    p.add_argument("--labels", help="uint8 .npy (N,)")
    p.add_argument("--limit", type=int, default=0, help="the first N images (0 = all)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", help="directory for scores.npy (and z.npy)")
    args = p.parse_args(argv)

    model = load(args.weights)
    images = read_npy(args.images)
    n = images.shape[0] if args.limit <= 0 else min(args.limit, images.shape[0])
    revnet = isinstance(model, FiRevNet)
    # The same model in float64: its round trip shows whether the inverse is exact, apart
    # from float32 rounding (an affine coupling's division by small scales amplifies that).
    model64 = copy.deepcopy(model).double() if revnet else None
    scores, zs, recon, recon64 = [], [], 0.0, 0.0
    with torch.no_grad():
        for start in range(0, n, args.batch):
            batch = images[start:min(start + args.batch, n)]
            if revnet:
                z, s = model(batch)
                x = model.encode(batch)
                recon = max(recon, (model.inverse(z) - x).abs().max().item())
                x64 = x.double()
                recon64 = max(recon64, (model64.inverse(model64.flow(x64)) - x64).abs().max().item())
                zs.append(z)
            else:
                s = model(batch)
            scores.append(s)
    scores = torch.cat(scores)
    result = {
        "schema": model.metadata["schema"],
        "model": "firevnet" if revnet else "cnn",
        "parameters": sum(t.numel() for t in model.parameters()),
        "torch": torch.__version__,
        "n": n,
    }
    if args.labels:
        labels = read_npy(args.labels)[:n].to(torch.long)
        errors = int((scores.argmax(1) != labels).sum())
        result.update(errors=errors, error_percent=100.0 * errors / max(n, 1))
    if revnet:
        result["reconstruction_max_abs"] = recon
        result["reconstruction_max_abs_float64"] = recon64
    if args.out:
        import os
        os.makedirs(args.out, exist_ok=True)
        write_npy(os.path.join(args.out, "scores.npy"), scores)
        if revnet:
            write_npy(os.path.join(args.out, "z.npy"), torch.cat(zs))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
