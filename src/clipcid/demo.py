"""`clipcid demo`: the pipeline end to end on the embedded offline corpus.

Stages so far: corpus -> held-out suite -> teacher embeddings. Every stage resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from clipcid.corpus.build import BuildDemoConfig, build_demo_corpus, summary_table
from clipcid.corpus.eval_suite import build_eval_suite
from clipcid.embed import EmbedConfig, embed

log = logging.getLogger("clipcid")

TEACHER_ARCH = "clipcid-small"


@dataclass
class DemoConfig:
    out: str = "demo"
    quick: bool = False
    workers: int = 2
    npm_root: str = "node_modules"


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    timings: dict[str, float] = {}

    def stage(name: str, fn):
        start = time.monotonic()
        log.info("== %s", name)
        result = fn()
        timings[name] = time.monotonic() - start
        log.info("== %s done in %.1f s", name, timings[name])
        return result

    limit = 3000 if cfg.quick else None
    corpus = stage(
        "corpus",
        lambda: build_demo_corpus(
            BuildDemoConfig(out=str(out / "corpus"), limit=limit, workers=cfg.workers, npm_root=cfg.npm_root)
        ),
    )
    print(summary_table(corpus))
    stage("eval-suite", lambda: build_eval_suite(str(out / "eval"), npm_root=cfg.npm_root, workers=cfg.workers))
    # Until the demo teacher is trained (issue 7), embeddings come from a seeded random-init teacher:
    # they exercise the pipeline but carry no knowledge.
    summary = stage(
        "embed",
        lambda: embed(
            EmbedConfig(
                data=str(out / "corpus"),
                model=TEACHER_ARCH,
                out=str(out / "teacher_emb"),
                workers=cfg.workers,
                batch_size=256,
            )
        ),
    )
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:8.1f} s")
    return {"timings": timings, "corpus": corpus, "embeddings": summary}
