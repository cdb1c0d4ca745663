"""Train the same small ResNet-v2 eagerly and with fused blocks; the curves must agree.

    python examples/train_digits.py                          # GPU if there is one: full run
    python examples/train_digits.py --steps 20 --device cpu  # CPU: Triton interpreted, slow
    python examples/train_digits.py --out curves.json        # the curves and the verdict as JSON

Data: scikit-learn's ``load_digits`` (1797 8x8 grey images of digits, 10 classes; shipped inside
scikit-learn, no download), a fixed 1500 / 297 train / test split. Model: a CIFAR-style
ResNet-v2 (3x3 stem conv to 8 channels, no max pool), a basic unit 8 -> 8, a basic unit
8 -> 16 with stride 2, final BN + ReLU, global average pool, linear. The eager model uses the
reference blocks, the fused one ``--backend``'s blocks; both start from the same state_dict and
see the same batches in the same order, each with its own SGD optimizer.

Verdict (exit status 1 when it fails): per-step training loss within ``--loss-rtol`` (relative)
over the first ``--strict-steps`` steps (fp32 trajectories drift apart slowly, as any two
differently-rounded runs do, so later steps are reported, not judged), and final test accuracy
within ``--acc-tol`` points.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="SGD steps (default 600)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--backend", default="triton", choices=("triton", "cuda", "auto", "reference"),
                        help="the fused model's backend (default triton)")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="print every N steps")
    parser.add_argument("--strict-steps", type=int, default=50,
                        help="steps over which the per-step loss must agree (default 50)")
    parser.add_argument("--loss-rtol", type=float, default=1e-3)
    parser.add_argument("--acc-tol", type=float, default=2.0, help="accuracy points")
    parser.add_argument("--eval-size", type=int, default=0,
                        help="test images to evaluate (default 0: all 297; the CI test uses fewer)")
    parser.add_argument("--out", default=None, help="write the curves and the verdict to this JSON")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.eval_size < 0 or args.log_every < 1:
        parser.error("--steps and --log-every must be >= 1, --batch-size >= 2 (BatchNorm needs 2 values "
                     "per channel), --eval-size >= 0")
    return args


def _prepare_environment(device: str, backend: str) -> None:
    """Without a GPU, Triton kernels can only run under the interpreter, which is read when
    triton is first imported: set it before importing torch / resnet_fused."""
    if device == "cpu" and backend == "triton" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def load_data(device: Any) -> tuple:
    """(x_train, y_train, x_test, y_test): digits as (N, 1, 8, 8) fp32, standardised."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split
    x, y = x[order], y[order]
    mean, std = x[:1500].mean(), x[:1500].std()
    x = (x - mean) / std
    return x[:1500].to(device), y[:1500].to(device), x[1500:].to(device), y[1500:].to(device)


def build_model(backend: str) -> Any:
    """The small CIFAR-style ResNet-v2 with ``backend``'s blocks (reference = eager)."""
    import torch.nn as nn

    import resnet_fused as rf
    from resnet_fused.reference import BatchNormReLU2d

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        rf.make_block("basic", backend=backend, in_chs=8, out_chs=8),
        rf.make_block("basic", backend=backend, in_chs=8, out_chs=16, stride=2),
        BatchNormReLU2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def accuracy(model: Any, x: Any, y: Any, batch_size: int = 512) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train()
    return 100.0 * correct / len(y)


def run(args: argparse.Namespace) -> dict:
    """Train both models; returns the curves, accuracies, launch counts and the verdict."""
    import torch
    import torch.nn.functional as F

    import resnet_fused as rf
    from resnet_fused.triton.launch import launch_counts, reset_launch_counts

    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = load_data(device)
    torch.manual_seed(args.seed)
    eager = build_model("reference").to(device)
    fused = build_model(args.backend).to(device)
    fused.load_state_dict(eager.state_dict())  # the same initial state, key for key
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
                  for name, m in (("eager", eager), ("fused", fused))}
    batches = torch.Generator().manual_seed(args.seed + 1)
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    print(f"device {device} ({'Triton interpreter' if interpreted else 'compiled kernels'}), fused backend "
          f"{args.backend}, {args.steps} steps of {args.batch_size}", flush=True)

    loss_eager, loss_fused, launches = [], [], 0
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, len(y_train), (args.batch_size,), generator=batches).to(device)
        x, y = x_train[index], y_train[index]
        losses = {}
        for name, model in (("eager", eager), ("fused", fused)):
            reset_launch_counts()
            loss = F.cross_entropy(model(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            losses[name] = loss.item()
            if name == "fused":
                launches += sum(launch_counts().values())
        loss_eager.append(losses["eager"])
        loss_fused.append(losses["fused"])
        if step % args.log_every == 0 or step == args.steps - 1:
            rel = abs(losses["fused"] - losses["eager"]) / abs(losses["eager"])
            print(f"step {step:5d}  loss eager {losses['eager']:.6f}  fused {losses['fused']:.6f}  "
                  f"rel diff {rel:.2e}", flush=True)

    if args.eval_size > 0:
        x_test, y_test = x_test[:args.eval_size], y_test[:args.eval_size]
    acc_eager, acc_fused = accuracy(eager, x_test, y_test), accuracy(fused, x_test, y_test)
    rel = [abs(f - e) / abs(e) for e, f in zip(loss_eager, loss_fused)]
    strict = rel[:args.strict_steps]
    passed = max(strict) <= args.loss_rtol and abs(acc_fused - acc_eager) <= args.acc_tol
    result = dict(
        config=dict(steps=args.steps, batch_size=args.batch_size, backend=args.backend, device=str(device),
                    lr=args.lr, seed=args.seed, interpreted=interpreted, loss_rtol=args.loss_rtol,
                    acc_tol=args.acc_tol, strict_steps=args.strict_steps, test_images=len(y_test)),
        versions=dict(python=platform.python_version(), torch=torch.__version__, resnet_fused=rf.__version__,
                      gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        loss_eager=loss_eager, loss_fused=loss_fused, loss_rel_diff=rel,
        max_rel_loss_diff_strict=max(strict), max_rel_loss_diff_all=max(rel),
        acc_eager=acc_eager, acc_fused=acc_fused, fused_kernel_launches=launches,
        seconds=time.perf_counter() - start, passed=passed)
    print(f"test accuracy eager {acc_eager:.2f}%  fused {acc_fused:.2f}%  | max rel loss diff "
          f"{max(strict):.2e} over the first {len(strict)} steps ({max(rel):.2e} over all) | fused kernel "
          f"launches {launches} | {'PASS' if passed else 'FAIL'}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _prepare_environment(args.device, args.backend)
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
