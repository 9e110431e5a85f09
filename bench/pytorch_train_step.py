#!/usr/bin/env python3
"""PyTorch reference for the training-step throughput benchmark.

Measures the wall time of ONE step at batch 128, float32, on CPU, for the
workloads specified in bench/README.md:

  firevnet_cpu  training step (zero_grad + forward + loss + backward + optimiser
                step) of the fully invertible Glow-style RevNet (MNIST cpu
                profile), CE + NLL, Adamax lr 1e-3
  firevnet_ice  the same flow's iCE step: forward, 5 Adamax steps of the
                nuisance classifier (MLP 1014-512-512-10, dropout 0.1) on the
                detached z_n, then CE + MLE (learned factorial Gaussian on z_n)
                + the clipped adversarial term, backward, flow and prior steps
  cnn_small     training step of the small ResNet-style MNIST classifier, Adam
  pgd_cnn       one L-inf PGD step on cnn_small: forward + input gradient of the
                cross-entropy, signed step, projection onto the ball and [0, 1]

The Rust side (benches/train_step.rs) implements the same models.

Usage:
  python bench/pytorch_train_step.py --threads N [--warmup 3] [--iters 10]
                                     [--workloads firevnet_cpu,firevnet_ice,cnn_small,pgd_cnn]
  python bench/pytorch_train_step.py --check   # model sanity checks, no timing

Prints ONE JSON object on stdout; anything else goes to stderr. Each result
carries the process's peak RSS (ru_maxrss) and its RSS before the workload was
built, so run one workload per process to read a workload's peak.
"""

import argparse
import json
import math
import resource
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
    """Returns step(), a closure running one step of the workload, built with a fixed seed."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    if name in ("firevnet_cpu", "firevnet_ice"):
        model = FIRevNet()
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        x = torch.rand(BATCH, 1, 32, 32, generator=g) * 2.0 - 1.0
        y = torch.randint(0, 10, (BATCH,), generator=g)
        model.train()
        if name == "firevnet_ice":
            return ice_step_fn(model, opt, x, y)
        return lambda: train_step(model, opt, firevnet_loss, x, y)
    if name in ("cnn_small", "pgd_cnn"):
        model = CNNSmall()
        x = torch.rand(BATCH, 1, 28, 28, generator=g) * 2.0 - 1.0
        y = torch.randint(0, 10, (BATCH,), generator=g)
        if name == "pgd_cnn":
            return pgd_step_fn(model, (x + 1.0) / 2.0, y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        return lambda: train_step(model, opt, cnn_loss, x, y)
    raise SystemExit(f"unknown workload: {name!r} (known: {', '.join(WORKLOADS)})")


WORKLOADS = ("firevnet_cpu", "firevnet_ice", "cnn_small", "pgd_cnn")


def train_step(model, opt, loss_fn, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    return loss


class Adversary(nn.Module):
    """The nuisance classifier D(z_n): Linear -> ReLU -> Dropout, twice, then a linear readout."""

    def __init__(self, inputs, width=512, classes=10, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, classes),
        )

    def forward(self, z):
        return self.net(z)


class FactorialGaussian(nn.Module):
    """log N(z; mean, diag exp(2 logs)) per example, mean and logs learned."""

    def __init__(self, dims):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dims))
        self.logs = nn.Parameter(torch.zeros(dims))

    def forward(self, z):
        scaled = (z - self.mean) * torch.exp(-self.logs)
        return (-0.5 * scaled ** 2).sum(1) - self.logs.sum() - 0.5 * LOG_2PI * z.shape[1]


def ice_step_fn(model, opt, x, y, inner_steps=5, classes=10):
    """The cpu profile's iCE step (src/nn/ice.rs, variant `paper`, MLE `paper`)."""
    dims = x[0].numel()
    # z_s: the first `classes` channels at (2, 2) of the final map; z_n: every other latent entry.
    final_offset = dims - 16 * 4 * 4
    logit_rows = torch.tensor([final_offset + c * 16 + 2 * 4 + 2 for c in range(classes)])
    keep = torch.ones(dims, dtype=torch.bool)
    keep[logit_rows] = False
    nuisance_rows = keep.nonzero().squeeze(1)
    adversary = Adversary(dims - classes)
    adversary_opt = torch.optim.Adamax(adversary.parameters(), lr=1e-3)
    prior = FactorialGaussian(dims - classes)
    prior_opt = torch.optim.Adamax(prior.parameters(), lr=1e-3)
    log_chance = math.log(classes)
    b = x.shape[0]

    def step():
        z, zs, _, logp, logdet = model(x)
        latent = torch.cat([t.flatten(1) for t in zs] + [z.flatten(1)], dim=1)
        logits = latent[:, logit_rows]
        nuisance = latent[:, nuisance_rows]
        # The adversary's own game on the detached z_n.
        adversary.train()
        detached = nuisance.detach()
        for _ in range(inner_steps):
            adversary_opt.zero_grad(set_to_none=True)
            F.cross_entropy(adversary(detached), y).backward()
            adversary_opt.step()
        # The encoder's loss; D's parameters take no gradient from it.
        opt.zero_grad(set_to_none=True)
        prior_opt.zero_grad(set_to_none=True)
        adversary.eval()
        for p in adversary.parameters():
            p.requires_grad_(False)
        ce = F.cross_entropy(logits, y)
        nll = -(prior(nuisance) + logdet + 0.0 * logp).sum() / b / (dims * math.log(2.0))
        log_likelihood = F.log_softmax(adversary(nuisance), dim=1).gather(1, y[:, None]).squeeze(1)
        below = (-log_likelihood.detach() < log_chance).float()
        adversarial = (log_likelihood * below).sum() / b
        loss = ce + nll + adversarial
        loss.backward()
        for p in adversary.parameters():
            p.requires_grad_(True)
        opt.step()
        prior_opt.step()
        return loss

    return step


def pgd_step_fn(model, clean, y, epsilon=0.1, steps=40, step_factor=2.5):
    """One L-inf PGD step (src/attack/pgd.rs) on images in [0, 1]: the iterate's class and the
    input gradient of the cross-entropy, a signed step of size step_factor * epsilon / steps, then the
    projection onto the ball around the clean images and onto [0, 1]."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    alpha = step_factor * epsilon / steps
    state = {"x": clean.clone()}

    def step():
        x = state["x"].clone().requires_grad_(True)
        logits = model(x)
        state["prediction"] = logits.detach().argmax(1)  # which examples broke
        loss = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            moved = x + alpha * grad.sign()
            moved = torch.min(torch.max(moved, clean - epsilon), clean + epsilon).clamp_(0.0, 1.0)
        state["x"] = moved
        return loss

    return step


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def rss_mb():
    """The process's resident set now, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_workload(name, warmup, iters):
    base_rss = rss_mb()
    step = make_workload(name)
    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t0) * 1e3)
    if not torch.isfinite(loss).item():
        print(f"warning: {name}: non-finite loss {loss.item()}", file=sys.stderr)
    return {
        "workload": name,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "base_rss_mb": base_rss,
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
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
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
