"""Benchmark: SSI probe training, lasa_jax.method.probe.train_probe vs the same recipe in PyTorch, on CPU.

Same data (N cached features of width d, 90/10 train/validation), same MLP, AdamW, gradient-norm
clipping, batch size, per-epoch shuffling and validation pass, same plateau LR rule; early stopping
disabled so both run exactly --epochs epochs. JAX compile time is reported on its own.
Timing through bench/_timing.py: the sides alternate for --rounds rounds (train_probe recompiles
inside each call, so it reports its own compile-free training seconds); the ratio is the median
over rounds with its min-max, withheld when the load average exceeds the core count.

    PYTHONPATH=. python bench/ssi.py                 # d=1024, N=20000, 20 epochs
    PYTHONPATH=. python bench/ssi.py --d 4096
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def make_data(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d) / math.sqrt(d)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + np.outer(2 * y - 1, direction) * 3.0
    n_val = n // 10
    return (x[n_val:].astype(np.float32), y[n_val:], x[:n_val].astype(np.float32), y[:n_val])


def train_torch(x, y, x_val, y_val, cfg, threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    d = x.shape[1]
    h = d if cfg.hidden == -1 else cfg.hidden
    net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.LayerNorm(h), torch.nn.GELU(),
                              torch.nn.Dropout(cfg.dropout), torch.nn.Linear(h, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x, y = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    x_val, y_val = torch.from_numpy(x_val), torch.from_numpy(y_val.astype(np.float32))
    gen = torch.Generator().manual_seed(cfg.seed)
    lr, best, since_best, since_lr, val_losses = cfg.learning_rate, math.inf, 0, 0, []
    for _ in range(cfg.max_epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]  # last batch partial, like the masked JAX one
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx])[:, 0], y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(x_val)[:, 0], y_val))
        val_losses.append(val_loss)
        # Same plateau rule as lasa_jax.method.probe.train_probe (not ReduceLROnPlateau, which waits one
        # epoch longer), so both runs do the same work.
        if val_loss < best:
            best, since_best, since_lr = val_loss, 0, 0
        else:
            since_best += 1
            since_lr += 1
        if since_best >= cfg.early_stop_patience:
            break
        if since_lr >= cfg.lr_patience:
            lr *= cfg.lr_factor
            since_lr = 0
            for group in opt.param_groups:
                group["lr"] = lr
    return val_losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="cached features (train + validation)")
    parser.add_argument("--d", type=int, default=1024, help="feature width (4096 for 8B models)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads; JAX's CPU backend uses one per core")
    parser.add_argument("--skip-torch", action="store_true")
    _timing.add_arguments(parser, rounds=5)
    parser.set_defaults(warmup=0)  # each call trains from scratch; train_probe excludes its compile
    args = parser.parse_args()
    session = _timing.Session.from_args(args, "ssi")

    import jax

    from lasa_jax.method import probe as ssi

    cfg = ssi.default_ssi_config()
    cfg.max_epochs = args.epochs
    cfg.early_stop_patience = args.epochs + 1  # fixed epoch count for timing
    x, y, x_val, y_val = make_data(args.n, args.d, seed=0)
    print(f"N={args.n} (train {len(x)}, val {len(x_val)}), d={args.d}, H={args.d}, batch "
          f"{cfg.batch_size}, {args.epochs} epochs; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"cores available {len(os.sched_getaffinity(0))}")
    steps = args.epochs * -(-len(x) // cfg.batch_size)

    def ours():
        _, hist = ssi.train_probe(x, y, x_val, y_val, cfg, seed=0)
        return _timing.Measured(hist["train_seconds"], hist)

    sides = {"lasa_jax train_probe": ours}
    if not args.skip_torch:
        import torch

        def reference():
            t0 = time.perf_counter()
            val_losses = train_torch(x, y, x_val, y_val, cfg, args.threads)
            return _timing.Measured(time.perf_counter() - t0, val_losses)
        sides[f"torch ({torch.__version__}, {args.threads} threads)"] = reference
    res = session.compare("SSI probe training", sides, work=steps, unit="steps")
    hist = res.outputs["lasa_jax train_probe"]
    print(f"jax: compile {hist['compile_seconds']:.2f} s per call (excluded), final val loss {hist['val_loss'][-1]:.4f}")
    if not args.skip_torch:
        print(f"torch: final val loss {res.outputs[list(sides)[1]][-1]:.4f}")
    return session.finish(extra={"compile_seconds": hist["compile_seconds"]})


if __name__ == "__main__":
    sys.exit(main())
