"""Where a long clipcid command's time goes, stage by stage: CPU time, page faults and a sampled profile.

Runs COMMAND (e.g. `clipcid demo --out demo`) and, while it runs:
- every second, sums user and system CPU seconds and minor page faults over its whole process tree
  (live processes from /proc, plus what finished children left in their parents' counters), so
  loader workers and rendering pools count too;
- at each stage's start (the `== NAME` line the pipeline and the demo log), starts py-spy on the tree
  (--subprocesses, --nonblocking, raw stacks) and stops it at the next stage.

Then it prints, per stage: wall seconds, user and system CPU seconds, the system share, minor faults,
and for the stages profiled a split of the sampled time by what the stack was doing (decode, transform,
trunk, text encoder, projection, writing, rendering, ...; the first matching category wins, main
process and workers apart). py-spy samples Python threads: time in torch's own worker threads shows up
under the Python frame that called into torch, and kernel time under the call that faulted.

    python benchmarks/demo_profile.py --out prof -- .venv/bin/clipcid demo --out demo
    python benchmarks/demo_profile.py --out prof --summary-only   # the tables again, from prof/

Needs py-spy (pip install py-spy); without it only the CPU table is made.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
STAGE_LINE = re.compile(r"INFO == (\w+)\s*$")
# What a stack is doing, by the first pattern any of its frames matches (order matters).
CATEGORIES = (
    ("render", r"render_png|render_svg|render_glyphs|_render_"),
    ("sources", r"corpus/sources\.py|collect_training_artwork"),
    ("text encoder", r"text_pooled|encode_text|BertModel|TextTransformer|encode_texts|text_features"),
    ("trunk", r"forward_features|EfficientNet|MobileNet|encode_image|VisionTransformer|_conv_forward|encode_images"),
    ("projection", r"project_embeddings"),
    ("metrics", r"zeroshot_classification\.py|linear_probe\.py|zeroshot_retrieval\.py|LBFGS"),
    ("train step", r"train_projections|_engine_run_backward|backward|Trainer\.|optimizer|adamw"),
    ("decode", r"_decode|ImageFile\.load|Image\.open|PngImagePlugin|\.convert \("),
    ("transform", r"transforms|Compose|to_tensor|resize"),
    ("collate", r"_collate|default_collate|storage\.py|_share_"),
    ("tar reading", r"tarfile|tariterators|iter_rows|iter_tar_samples"),
    ("writing", r"write_part|_write_part|write_tar|save_json|write_table|np\.save|save_npy"),
)


def tree_counters(root: int) -> dict:
    """User/system seconds and minor faults of `root` and every descendant, live or waited for."""
    stats: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                text = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            stats[int(name)] = text[text.rindex(")") + 2 :].split()  # fields from the state on
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, f in stats.items():
        children[int(f[1])].append(pid)
    total = {"user": 0.0, "system": 0.0, "minor_faults": 0}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            f = stats[pid]  # minflt 7, cminflt 8, utime 11, stime 12, cutime 13, cstime 14
            total["minor_faults"] += int(f[7]) + int(f[8])
            total["user"] += (int(f[11]) + int(f[13])) / TICK
            total["system"] += (int(f[12]) + int(f[14])) / TICK
            todo.extend(children[pid])
    return total


class Profiler:
    def __init__(self, out: Path, rate: int):
        self.out, self.rate, self.spy, self.stage = out, rate, None, None
        self.py_spy = shutil.which("py-spy")

    def start(self, stage: str, pid: int) -> None:
        self.stop()
        self.stage = stage
        if self.py_spy:
            cmd = [self.py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate",
                   str(self.rate), "--format", "raw", "-o", str(self.out / f"{stage}.stacks")]  # fmt: skip
            self.spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.started = time.monotonic()

    def stop(self) -> None:
        if self.spy is not None:
            time.sleep(max(0.0, 2 - (time.monotonic() - self.started)))  # py-spy must be attached to take SIGINT
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.spy.kill()
            self.spy = None


def record(cmd: list[str], out: Path, rate: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # a thread, so that the counters are sampled while the command is quiet
        for line in proc.stdout:
            lines.put((time.time(), line.rstrip("\n")))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    profiler = Profiler(out, rate)
    marks, last, ended = [], {}, False
    with open(out / "counters.jsonl", "w") as counters, open(out / "output.log", "w") as log:
        while not ended:
            deadline = time.time() + 1
            while time.time() < deadline:
                try:
                    item = lines.get(timeout=max(0.0, deadline - time.time()))
                except queue.Empty:
                    break
                if item is None:
                    ended = True
                    break
                when, line = item
                sys.stdout.write(line + "\n")
                log.write(f"{when:.1f} {line}\n")
                m = STAGE_LINE.search(line)
                if m:
                    marks.append({"stage": m.group(1), "t": when, **tree_counters(proc.pid)})
                    profiler.start(m.group(1), proc.pid)
            if proc.poll() is None:
                last = {"t": time.time(), **tree_counters(proc.pid)}  # the end's figures: the last second is lost
                counters.write(json.dumps(last) + "\n")
    proc.wait()
    profiler.stop()
    end = {"stage": None, **last, "t": time.time()}
    (out / "stages.json").write_text(json.dumps(marks + [end], indent=1))
    return proc.returncode


def stage_table(out: Path) -> list[dict]:
    marks = json.loads((out / "stages.json").read_text())
    rows = []
    for a, b in zip(marks, marks[1:], strict=False):
        row = {"stage": a["stage"], "wall": b["t"] - a["t"]}
        row.update({k: b[k] - a[k] for k in ("user", "system", "minor_faults")})
        rows.append(row)
    return rows


def split_of(stacks: Path) -> dict:
    """Sampled seconds per (process role, category) of one stage's raw py-spy stacks. py-spy writes a
    stack as the chain of processes down to the sampled one, then its frames: the shortest chains are
    the command's main Python process, longer ones its workers (loaders, pools)."""
    rows = []
    for line in stacks.read_text().splitlines():
        if line.strip():
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            depth = sum(f.startswith("process ") for f in frames)
            rows.append((depth, [f for f in frames if not f.startswith("process ")], int(count)))
    main_depth = min((d for d, _, _ in rows), default=0)
    rate = json.loads((stacks.parent / "rate.json").read_text())["rate"]
    got: collections.Counter = collections.Counter()
    for depth, body, count in rows:
        role = "main" if depth == main_depth else "workers"
        what = next((name for name, rx in CATEGORIES if any(re.search(rx, f) for f in body)), "other")
        got[(role, what)] += count / rate
    return dict(got)


def summary(out: Path) -> None:
    rows = stage_table(out)
    print("\n| stage | wall s | user s | system s | system share | minor faults (M) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = r["user"] + r["system"]
        print(f"| {r['stage']} | {r['wall']:.0f} | {r['user']:.0f} | {r['system']:.0f} | "
              f"{100 * r['system'] / cpu if cpu else 0:.0f} % | {r['minor_faults'] / 1e6:.1f} |")  # fmt: skip
    total = {k: sum(r[k] for r in rows) for k in ("wall", "user", "system", "minor_faults")}
    share = 100 * total["system"] / (total["user"] + total["system"])
    print(f"| total | {total['wall']:.0f} | {total['user']:.0f} | {total['system']:.0f} | {share:.0f} % | "
          f"{total['minor_faults'] / 1e6:.1f} |")  # fmt: skip
    for r in rows:
        stacks = out / f"{r['stage']}.stacks"
        if not stacks.is_file() or r["wall"] < 30:
            continue
        split = split_of(stacks)
        sampled = sum(split.values())
        print(f"\n{r['stage']} ({r['wall']:.0f} s wall): sampled Python-thread seconds by what the stack was doing\n")
        print("| process | doing | seconds | share |")
        print("|---|---|---:|---:|")
        for (role, what), s in sorted(split.items(), key=lambda kv: -kv[1]):
            if s / sampled >= 0.005:
                print(f"| {role} | {what} | {s:.0f} | {100 * s / sampled:.1f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the counters, stacks and log")
    ap.add_argument("--rate", type=int, default=25, help="py-spy samples per second")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    out = Path(args.out)
    if not args.summary_only:
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        out.mkdir(parents=True, exist_ok=True)
        (out / "rate.json").write_text(json.dumps({"rate": args.rate, "cmd": cmd}))
        code = record(cmd, out, args.rate)
        if code:
            sys.exit(code)
    summary(out)


if __name__ == "__main__":
    main()
