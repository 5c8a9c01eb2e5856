"""Benchmark: SSI probe training, lasa_jax.method.probe.train_probe vs the same recipe in PyTorch, on CPU.

Same data (N cached features of width d, 90/10 train/validation), same MLP, AdamW, gradient-norm
clipping, batch size, per-epoch shuffling and validation pass, same plateau LR rule; early stopping
disabled so both run exactly --epochs epochs. JAX compile time is reported on its own.

    PYTHONPATH=. python bench/ssi.py                 # d=1024, N=20000, 20 epochs
    PYTHONPATH=. python bench/ssi.py --d 4096
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


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
    args = parser.parse_args()

    import jax

    from lasa_jax.method import probe as ssi

    cfg = ssi.default_ssi_config()
    cfg.max_epochs = args.epochs
    cfg.early_stop_patience = args.epochs + 1  # fixed epoch count for timing
    x, y, x_val, y_val = make_data(args.n, args.d, seed=0)
    print(f"N={args.n} (train {len(x)}, val {len(x_val)}), d={args.d}, H={args.d}, batch "
          f"{cfg.batch_size}, {args.epochs} epochs; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"cores available {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f} "
          "(timings on a shared, oversubscribed CPU are noisy; torch threads collapse worst)")
    steps = args.epochs * -(-len(x) // cfg.batch_size)

    t0 = time.perf_counter()
    _, hist = ssi.train_probe(x, y, x_val, y_val, cfg, seed=0)
    jax_total = time.perf_counter() - t0
    jax_train = hist["train_seconds"]
    print(f"jax:   train {jax_train:8.2f} s   compile {hist['compile_seconds']:.2f} s   "
          f"call total {jax_total:.2f} s   {1000 * jax_train / steps:.1f} ms/step   final val loss {hist['val_loss'][-1]:.4f}   "
          f"epochs {hist['epochs_run']}")
    if args.skip_torch:
        return
    import torch

    t0 = time.perf_counter()
    val_losses = train_torch(x, y, x_val, y_val, cfg, args.threads)
    torch_train = time.perf_counter() - t0
    print(f"torch: train {torch_train:8.2f} s   ({torch.__version__}, {torch.get_num_threads()} threads)   "
          f"{1000 * torch_train / steps:.1f} ms/step"
          f"   final val loss {val_losses[-1]:.4f}   epochs {len(val_losses)}")
    print(f"ratio torch / jax (train time, compile excluded): {torch_train / jax_train:.2f}x; "
          f"including compile: {torch_train / (jax_train + hist['compile_seconds']):.2f}x")


if __name__ == "__main__":
    main()
