#!/usr/bin/env python3
"""PyTorch reference for the training-step throughput benchmark.

Measures the wall time of ONE training step (zero_grad + forward + loss +
backward + optimiser step) at batch 128, float32, on CPU, for the two models
specified in bench/README.md:

  firevnet_cpu  fully invertible Glow-style RevNet (MNIST cpu profile), Adamax lr 1e-3
  cnn_small     small ResNet-style MNIST classifier, Adam lr 1e-3

The Rust side (benches/train_step.rs) implements the same models.

Usage:
  python bench/pytorch_train_step.py --threads N [--warmup 3] [--iters 10]
                                     [--workloads firevnet_cpu,cnn_small]
  python bench/pytorch_train_step.py --check   # model sanity checks, no timing

Prints ONE JSON object on stdout; anything else goes to stderr.
"""

import argparse
import json
import math
import statistics
import sys
import time
import warnings

# A plain `pip install torch` venv has no NumPy; torch warns about it on import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH = 128
SEED = 0
LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------
# (a) firevnet_cpu
# --------------------------------------------------------------------------

def squeeze2(x):
    """Space-to-depth 2x2, Glow order: (B,C,H,W) -> (B,4C,H/2,W/2)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2(x):
    """Inverse of squeeze2."""
    b, c4, h, w = x.shape
    c = c4 // 4
    x = x.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """y = (x + b) * exp(s), per channel. Init b = 0, s = 0 (no data-dependent init)."""

    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return (x + self.bias) * torch.exp(self.logs)

    def logdet(self, x):
        return x.shape[2] * x.shape[3] * self.logs.sum()

    def inverse(self, y):
        return y * torch.exp(-self.logs) - self.bias


class Conv2dZeros(nn.Module):
    """Glow's Conv2dZeros: 3x3 conv (pad 1, bias), weight and bias zero-initialised,
    output multiplied per channel by exp(3 * logs), logs zero-initialised."""

    def __init__(self, cin, cout, logscale_factor=3.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class CouplingNN(nn.Module):
    """conv3x3(cin->64) -> ActNorm -> ReLU -> conv1x1(64->64) -> ActNorm -> ReLU
    -> Dropout(0.1) -> Conv2dZeros(64->cin). ActNorms here add no log-det; the
    convs before them have no bias (the ActNorm's bias makes it redundant)."""

    def __init__(self, cin, hidden=64, dropout=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1, bias=False)
        self.an1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, padding=0, bias=False)
        self.an2 = ActNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.conv3 = Conv2dZeros(hidden, cin)

    def forward(self, x):
        h = F.relu(self.an1(self.conv1(x)))
        h = F.relu(self.an2(self.conv2(h)))
        h = self.drop(h)
        return self.conv3(h)


class FlowStep(nn.Module):
    """ActNorm -> channel reverse -> additive coupling."""

    def __init__(self, c):
        super().__init__()
        assert c % 2 == 0
        self.actnorm = ActNorm(c)
        self.nn = CouplingNN(c // 2)

    def forward(self, x, logdet):
        logdet = logdet + self.actnorm.logdet(x)
        x = self.actnorm(x)
        x = torch.flip(x, dims=[1])
        c = x.shape[1] // 2
        xa, xb = x[:, :c], x[:, c:]
        yb = xb + self.nn(xa)
        return torch.cat([xa, yb], dim=1), logdet

    def inverse(self, y):
        c = y.shape[1] // 2
        ya, yb = y[:, :c], y[:, c:]
        x = torch.cat([ya, yb - self.nn(ya)], dim=1)
        x = torch.flip(x, dims=[1])
        return self.actnorm.inverse(x)


def gaussian_logp(x, mean, log_std):
    """Sum over all non-batch dims of log N(x; mean, exp(log_std)^2)."""
    lp = -0.5 * (LOG_2PI + 2.0 * log_std + (x - mean) ** 2 * torch.exp(-2.0 * log_std))
    return lp.flatten(1).sum(1)


class Split(nn.Module):
    """Keep z1 = first half, z2 = second half goes out; conditional prior
    h = Conv2dZeros(C/2 -> C)(z1), mean = h[:, :C/2], log_std = h[:, C/2:]."""

    def __init__(self, c):
        super().__init__()
        self.prior = Conv2dZeros(c // 2, c)

    def forward(self, x):
        c = x.shape[1] // 2
        z1, z2 = x[:, :c], x[:, c:]
        h = self.prior(z1)
        logp = gaussian_logp(z2, h[:, :c], h[:, c:])
        return z1, z2, logp

    def inverse(self, z1, z2):
        return torch.cat([z1, z2], dim=1)


class FIRevNet(nn.Module):
    """Fully invertible RevNet, MNIST cpu profile: input (B,1,32,32),
    3 levels x 4 flow steps, splits after levels 0 and 1, final map 16x4x4."""

    def __init__(self, in_ch=1, levels=3, depth=4, num_classes=10):
        super().__init__()
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.num_classes = num_classes
        c = in_ch
        for lvl in range(levels):
            c *= 4
            self.levels.append(nn.ModuleList([FlowStep(c) for _ in range(depth)]))
            if lvl < levels - 1:
                self.splits.append(Split(c))
                c //= 2
        self.final_channels = c

    def forward(self, x):
        """Returns (final z, list of split-off z2, logits, log_p_total, logdet_total)."""
        b = x.shape[0]
        logdet = x.new_zeros(b)
        logp = x.new_zeros(b)
        zs = []
        for lvl, steps in enumerate(self.levels):
            x = squeeze2(x)
            for step in steps:
                x, logdet = step(x, logdet)
            if lvl < len(self.splits):
                x, z2, lp = self.splits[lvl](x)
                zs.append(z2)
                logp = logp + lp
        # final prior N(0, 1)
        logp = logp + (-0.5 * (LOG_2PI + x ** 2)).flatten(1).sum(1)
        logits = x[:, : self.num_classes, 2, 2]
        return x, zs, logits, logp, logdet

    def inverse(self, z, zs):
        x = z
        for lvl in reversed(range(len(self.levels))):
            if lvl < len(self.splits):
                x = self.splits[lvl].inverse(x, zs[lvl])
            for step in reversed(self.levels[lvl]):
                x = step.inverse(x)
            x = unsqueeze2(x)
        return x


def firevnet_loss(model, x, y):
    _, _, logits, logp, logdet = model(x)
    d = x[0].numel()  # 1*32*32 = 1024
    nll_bpd = -(logp + logdet) / (d * math.log(2.0))  # no dequantisation constant
    return F.cross_entropy(logits, y) + nll_bpd.mean()


# --------------------------------------------------------------------------
# (b) cnn_small
# --------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=True)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class CNNSmall(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 16, 3, padding=1, bias=True)
        self.res1 = ResBlock(16)
        self.down1 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
        self.res2 = ResBlock(32)
        self.down2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=True)
        self.hidden = nn.Linear(32 * 7 * 7, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.conv0(x))          # 16x28x28
        x = self.res1(x)
        x = F.relu(self.down1(x))          # 32x14x14
        x = self.res2(x)
        x = F.relu(self.down2(x))          # 32x7x7
        x = F.relu(self.hidden(x.flatten(1)))  # flatten (channel-major) -> 128
        return self.fc(x)


def cnn_loss(model, x, y):
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

def make_workload(name):
    """Returns (model, optimiser, loss_fn, x, y) built with a fixed seed."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    if name == "firevnet_cpu":
        model = FIRevNet()
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        x = torch.rand(BATCH, 1, 32, 32, generator=g) * 2.0 - 1.0
        loss_fn = firevnet_loss
    elif name == "cnn_small":
        model = CNNSmall()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(BATCH, 1, 28, 28, generator=g) * 2.0 - 1.0
        loss_fn = cnn_loss
    else:
        raise SystemExit(f"unknown workload: {name!r} (known: firevnet_cpu, cnn_small)")
    y = torch.randint(0, 10, (BATCH,), generator=g)
    model.train()
    return model, opt, loss_fn, x, y


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def train_step(model, opt, loss_fn, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    return loss


def bench_workload(name, warmup, iters):
    model, opt, loss_fn, x, y = make_workload(name)
    for _ in range(warmup):
        loss = train_step(model, opt, loss_fn, x, y)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = train_step(model, opt, loss_fn, x, y)
        times.append((time.perf_counter() - t0) * 1e3)
    if not torch.isfinite(loss).item():
        print(f"warning: {name}: non-finite loss {loss.item()}", file=sys.stderr)
    return {
        "workload": name,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "params": param_count(model),
    }


# --------------------------------------------------------------------------
# Sanity checks (--check)
# --------------------------------------------------------------------------

def run_checks():
    out = {"torch_version": torch.__version__}

    # cnn_small shapes / params
    torch.manual_seed(SEED)
    cnn = CNNSmall()
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    out["cnn_small_params"] = param_count(cnn)

    torch.manual_seed(SEED)
    net = FIRevNet()
    out["firevnet_cpu_params"] = param_count(net)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    net.eval()
    with torch.no_grad():
        z, zs, logits, logp, logdet = net(x)
    dims = [t[0].numel() for t in zs] + [z[0].numel()]
    out["latent_shapes"] = [list(t.shape[1:]) for t in zs] + [list(z.shape[1:])]
    out["latent_dims"] = dims
    assert tuple(z.shape[1:]) == (16, 4, 4), z.shape
    assert sum(dims) == 1024, dims
    assert logits.shape == (4, 10)

    # Invertibility + log-det: perturb all parameters away from their (mostly
    # identity) init so the check is non-trivial, then reconstruct x.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        z, zs, _, _, logdet = net(x)
        x_rec = net.inverse(z, zs)
    out["max_reconstruction_error"] = (x - x_rec).abs().max().item()
    assert out["max_reconstruction_error"] < 1e-4

    # Log-det vs brute-force Jacobian on one sample (1024x1024).
    x1 = x[:1].double()
    net64 = net.double()

    def flat_latent(inp):
        z_, zs_, _, _, _ = net64(inp.view(1, 1, 32, 32))
        return torch.cat([t.flatten() for t in zs_] + [z_.flatten()])

    jac = torch.autograd.functional.jacobian(flat_latent, x1.flatten(), vectorize=True)
    _, brute = torch.linalg.slogdet(jac)
    with torch.no_grad():
        _, _, _, _, ld = net64(x1)
    out["logdet_model"] = ld.item()
    out["logdet_bruteforce"] = brute.item()
    assert abs(ld.item() - brute.item()) < 1e-6 * max(1.0, abs(brute.item()))
    out["ok"] = True
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workloads", default="firevnet_cpu,cnn_small")
    ap.add_argument("--check", action="store_true", help="run model sanity checks instead of timing")
    args = ap.parse_args()
    if args.threads < 1 or args.iters < 1 or args.warmup < 0:
        ap.error("need --threads >= 1, --iters >= 1, --warmup >= 0")

    # Must come before any parallel work.
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:  # already initialised
        print(f"warning: set_num_interop_threads(1) failed: {e}", file=sys.stderr)
    torch.set_num_threads(args.threads)

    if args.check:
        print(json.dumps(run_checks()))
        return

    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    results = [bench_workload(n, args.warmup, args.iters) for n in names]
    print(json.dumps({
        "threads": args.threads,
        "torch_version": torch.__version__,
        "results": results,
    }))


if __name__ == "__main__":
    main()
