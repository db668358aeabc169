"""``python -m bprop demo``: train a small network on scikit-learn's digits.

The digits data (1797 8x8 images, 10 classes) ship with scikit-learn, so nothing
is downloaded. Features are scaled to [0, 1] by dividing by 16; a stratified 25%
of the samples is held out for testing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

OPTIMIZER_NAMES = ("adam", "sgd", "adamw", "rmsprop")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bprop",
                                     description="bprop command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    demo = sub.add_parser(
        "demo", help="train a ReLU network on scikit-learn's digits and report test accuracy",
        description="Trains a 64-<hidden>-10 ReLU network on scikit-learn's bundled digits "
                    "data (features / 16, 25% stratified hold-out) and prints the test "
                    "accuracy and the training time.")
    demo.add_argument("--hidden", type=int, nargs="+", default=[128], metavar="N",
                      help="hidden layer widths (default: 128)")
    demo.add_argument("--epochs", type=int, default=60, help="epochs (default: 60)")
    demo.add_argument("--batch-size", type=int, default=32, help="minibatch size (default: 32)")
    demo.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adam",
                      help="optimizer (default: adam)")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the split, the initial weights and the shuffling "
                           "(default: 0)")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                      help="network dtype (default: float32)")
    demo.add_argument("--plot", default="loss.png", metavar="PATH",
                      help="where to write the loss-curve PNG (default: loss.png)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    demo.add_argument("--save", default=None, metavar="PATH",
                      help="also save the trained network to this safetensors file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def demo(args: argparse.Namespace) -> int:
    import numpy as np

    import bprop
    from bprop import optim

    try:
        # scikit-learn ships no type information (and may be absent)
        from sklearn.datasets import load_digits  # type: ignore[import, unused-ignore]
        from sklearn.model_selection import train_test_split  # type: ignore[import, unused-ignore]
    except ImportError:
        print("the demo needs scikit-learn (for the digits data); install it, with the "
              "progress bar and the plot, by: pip install scikit-learn tqdm matplotlib",
              file=sys.stderr)
        return 2
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if any(h < 1 for h in args.hidden):
        print("--hidden widths must be >= 1", file=sys.stderr)
        return 2
    if not args.lr > 0:
        print("--lr must be > 0", file=sys.stderr)
        return 2

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=args.seed)

    widths = [X.shape[1], *args.hidden, 10]
    layers = [bprop.Dense(widths[i], widths[i + 1],
                          activation="relu" if i < len(widths) - 2 else "identity")
              for i in range(len(widths) - 1)]
    net = bprop.Network(layers, dtype=args.dtype, seed=args.seed)
    make = {"adam": optim.Adam, "sgd": optim.SGD, "adamw": optim.AdamW,
            "rmsprop": optim.RMSprop}[args.optimizer]
    optimizer = make(net, lr=args.lr)

    arch = "-".join(str(w) for w in widths)
    print(f"digits: {len(X_train)} training / {len(X_test)} test samples; network {arch} "
          f"(ReLU, {net.num_parameters:,} parameters, {args.dtype}); {optimizer!r}; "
          f"{args.epochs} epochs, batch {args.batch_size}")
    start = time.perf_counter()
    history = bprop.fit(net, X_train, y_train, loss="softmax_cross_entropy",
                        optimizer=optimizer, epochs=args.epochs, batch_size=args.batch_size,
                        seed=args.seed, verbose=not args.no_progress)
    seconds = time.perf_counter() - start
    test = bprop.evaluate(net, X_test, y_test, metrics=["accuracy"])
    train = bprop.evaluate(net, X_train, y_train, metrics=["accuracy"])
    print(f"training time: {seconds:.3f} s ({seconds / args.epochs * 1e3:.2f} ms per epoch)")
    print(f"train accuracy: {100 * train['accuracy']:.2f}%  (loss {train['loss']:.4f})")
    print(f"test accuracy: {100 * test['accuracy']:.2f}%  (loss {test['loss']:.4f}, "
          f"{round(test['accuracy'] * len(y_test))}/{len(y_test)} correct)")
    if not args.no_plot:
        try:
            history.plot(args.plot)
        except ImportError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
        else:
            print(f"loss curve: {args.plot}")
    if args.save:
        net.save(args.save, optimizer=optimizer)
        print(f"saved: {args.save}")
    del np
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return 2  # pragma: no cover - argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
