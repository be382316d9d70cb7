"""Training-step time of the project's model configs (CLIP loss, AdamW, fp32, CPU or GPU).

Anchor: the same step on clipcid-tiny, so the table's ratio says how much a bigger config costs.

    python benchmarks/model_step.py --batch-size 64 --steps 5
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from clipcid.models import count_parameters, project_model_names, register_model_configs

register_model_configs()  # the project's configs, for open_clip.create_model("clipcid-tiny")


def step_time(name: str, batch_size: int, steps: int, device: str) -> float:
    torch.manual_seed(0)
    model = open_clip.create_model(name).to(device).train()
    cfg = open_clip.get_model_config(name)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
    images = torch.randn(batch_size, 3, size, size, device=device)
    tokens = torch.randint(1, 49000, (batch_size, ctx), device=device)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        out = model(images, tokens)
        image_features, text_features, logit_scale = out[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    results = {name: step_time(name, args.batch_size, args.steps, args.device) for name in project_model_names()}
    anchor = results["clipcid-tiny"]
    print(
        f"batch {args.batch_size}, device {args.device}, threads {torch.get_num_threads()}, "
        f"median of {args.steps} steps"
    )
    print(f"| {'model':<14} | {'params':>11} | {'step s':>7} | {'img/s':>7} | {'ratio':>6} |")
    print(f"|{'-' * 16}|{'-' * 13}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for name, seconds in results.items():
        params = count_parameters(open_clip.create_model(name))["total"]
        print(
            f"| {name:<14} | {params:>11,} | {seconds:>7.3f} | {args.batch_size / seconds:>7.1f} | "
            f"{seconds / anchor:>6.2f} |"
        )


if __name__ == "__main__":
    main()
