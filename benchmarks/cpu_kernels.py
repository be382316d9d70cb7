"""Two kernel choices that torch leaves at their slow setting on a CPU, measured against that default:

(a) the student's AdamW step: torch's CPU default (one tensor at a time) against `foreach=True` and
    `fused=True`, on the parameters of --student with random gradients; time per step and the largest
    difference of the parameters from the default's after the timed steps;
(b) the teacher's image trunk in the feature pass: a timm CNN (--trunk, at --size px) in the default
    memory layout against channels_last; images per second and the largest difference of the features.

Each is the best of --rounds alternating rounds (so that the machine's noise hits both alike), and the
table gives the ratio to the default measured in the same run. Neither choice is taken by clipcid yet:
both change the numbers in the last bits (see docs/benchmarks.md), so they wait for a point where the
demo's figures are rerun anyway.

    python benchmarks/cpu_kernels.py [--student clipcid-tiny] [--trunk tf_efficientnet_lite0 --size 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from clipcid.models import load_model


def best_of(rounds: int, fns: dict) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], fn())
    return best


def adamw_steppers(student: str, steps: int) -> tuple[dict, dict]:
    params = [p for p in load_model(student, None, "cpu", 0).model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    kinds = {"default (one tensor at a time)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    state = {}
    for name, kw in kinds.items():
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c, g in zip(copies, grads, strict=True):
            c.grad = g.clone()
        opt = torch.optim.AdamW(copies, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, **kw)
        opt.step()  # warm-up, and the moments exist
        state[name] = (opt, copies)

    def timer(name):
        def run() -> float:
            opt = state[name][0]
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            return (time.perf_counter() - start) / steps

        return run

    return {name: timer(name) for name in kinds}, state


def trunk_passes(trunk: str, size: int, batch: int) -> tuple[dict, dict]:
    import timm

    model = timm.create_model(trunk, pretrained=False).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    layouts = {
        "default (contiguous)": (model, x),
        "channels_last": (
            timm.create_model(trunk, pretrained=False).eval().to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        ),
    }
    layouts["channels_last"][0].load_state_dict(model.state_dict())
    out = {}

    def timer(name):
        def run() -> float:
            m, inp = layouts[name]
            with torch.inference_mode():
                start = time.perf_counter()
                out[name] = m(inp)
                return batch / (time.perf_counter() - start)

        return run

    return {name: timer(name) for name in layouts}, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="clipcid-tiny")
    ap.add_argument("--steps", type=int, default=20, help="AdamW steps per timing")
    ap.add_argument("--trunk", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    timers, state = adamw_steppers(args.student, args.steps)
    seconds = best_of(args.rounds, timers)
    anchor = next(iter(seconds))
    table(
        f"(a) AdamW step over {args.student}'s parameters ({sum(p.numel() for p in state[anchor][1]):,})",
        ("implementation", "ms per step", "max abs difference of the parameters"),
        {
            name: (1000 * t, t / seconds[anchor], max(
                (a - b).abs().max().item() for a, b in zip(state[name][1], state[anchor][1], strict=True)
            ))
            for name, t in seconds.items()
        },
    )  # fmt: skip

    timers, out = trunk_passes(args.trunk, args.size, args.batch)
    for timer in timers.values():  # warm-up of both layouts
        timer()
    rates = best_of(args.rounds, timers)
    anchor = next(iter(rates))
    table(
        f"(b) {args.trunk} at {args.size} px, batch {args.batch}, inference",
        ("memory layout", "images/s", "max abs difference of the features"),
        {name: (r, r / rates[anchor], (out[name] - out[anchor]).abs().max().item()) for name, r in rates.items()},
    )


def table(title: str, head: tuple[str, str, str], rows: dict[str, tuple[float, float, float]]) -> None:
    """A markdown table: each contender's figure, its ratio to the first (the default), its difference."""
    print(f"\n{title}\n")
    print(f"| {head[0]} | {head[1]} | ratio to default | {head[2]} |")
    print("|---|---:|---:|---:|")
    for name, (value, ratio, diff) in rows.items():
        print(f"| {name} | {value:.1f} | {ratio:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
