"""`clipcid STAGE ...`: a thin argparse layer over the stage functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from clipcid.errors import ClipcidError
from clipcid.util.progress import setup_logging

log = logging.getLogger("clipcid")


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="build the offline corpus and the held-out evaluation suite")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    demo = data_sub.add_parser("build-demo", help="render the training corpus into webdataset shards")
    demo.add_argument("--out", required=True, help="output folder for the shards")
    demo.add_argument("--image-size", type=int, default=64)
    demo.add_argument("--limit", type=int, default=None, help="build only the first N planned samples")
    demo.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    demo.add_argument("--workers", type=int, default=_default_workers())
    demo.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    demo.add_argument("--npm-root", default="node_modules", help="where `make sources` installed the npm sets")
    demo.add_argument("--allow-missing", action="store_true", help="build even if some sources are missing")

    ev = data_sub.add_parser("build-eval", help="render the held-out evaluation suite (CLIP_benchmark wds layout)")
    ev.add_argument("--out", required=True)
    ev.add_argument("--image-size", type=int, default=64)
    ev.add_argument("--workers", type=int, default=_default_workers())
    ev.add_argument("--npm-root", default="node_modules")
    ev.add_argument("--only", nargs="+", default=None, help="build only these datasets")


def _add_embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="compute teacher image and text embeddings once, offline")
    p.add_argument(
        "--data",
        required=True,
        help="shards (folder, brace pattern or glob), img2dataset output, or a CSV/parquet table",
    )
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-bigG-14 or clipcid-small")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--out", required=True, help="output folder (clip-retrieval layout)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "amp_bf16", "amp"], default="fp32")
    p.add_argument("--workers", type=int, default=_default_workers(), help="data loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--rows-per-part", type=int, default=10000, help="table input: rows per part")
    p.add_argument("--image-column", default=None, help="table input: column holding image paths")
    p.add_argument("--caption-column", default=None, help="table input: column holding captions")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init when no --pretrained")


def _add_model_and_runtime_args(p: argparse.ArgumentParser) -> None:
    """Flags every evaluating command shares: which model, and how to run it."""
    p.add_argument("--model", required=True, help="open_clip architecture")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path")
    p.add_argument("--suite-root", default="demo/eval", help="where `clipcid data build-eval` wrote the suite")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--feature-root", default=None, help="cache image features here")
    p.add_argument("--workers", type=int, default=_default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "amp_bf16", "amp"], default="fp32")


def _add_eval_parsers(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot classification, linear probe or retrieval on one dataset")
    _add_model_and_runtime_args(p)
    p.add_argument(
        "--dataset",
        required=True,
        help="a CLIP_benchmark wds folder (or wds:PATH), imagefolder:PATH, or a held-out suite name",
    )
    p.add_argument(
        "--task",
        default="auto",
        choices=["auto", "zeroshot_classification", "linear_probe", "zeroshot_retrieval"],
    )
    p.add_argument("--output", default=None, help="result JSON; may use {dataset} {model} {pretrained} {task}")
    p.add_argument("--templates", default=None, help="file with one prompt template per line, {c} = class")
    p.add_argument("--classnames", default=None, help="file with one class name per line")
    p.add_argument("--fewshot-k", type=int, default=None, help="linear probe: k training samples per class")
    p.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("eval-suite", help="every task of the held-out suite, with summary.md and summary.csv")
    _add_model_and_runtime_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--only", nargs="+", default=None, help="only these datasets")


def _add_balance_parsers(sub) -> None:
    p = sub.add_parser(
        "balance",
        help="Image Semantic Balance: drop semantic near-duplicates "
        "(`clipcid balance inspect` shows the largest groups)",
    )
    p.add_argument("--emb", required=True, help="teacher embeddings folder (clipcid embed)")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.07, help="distance below which two images merge")
    p.add_argument(
        "--metric",
        choices=["l2", "sql2", "cosine"],
        default="l2",
        help="what the threshold bounds: |a-b|, |a-b|^2, or 1 - cos",
    )
    p.add_argument(
        "--target-removal",
        type=float,
        default=None,
        help="pick the threshold that removes this fraction instead",
    )
    p.add_argument("--search", choices=["exact", "ivf"], default="exact")
    p.add_argument("--nlist", type=int, default=None, help="ivf: number of cells (default sqrt(N*nprobe))")
    p.add_argument("--nprobe", type=int, default=4, help="ivf: cells each point is compared against")
    p.add_argument("--memory-gb", type=float, default=2.0, help="memory for one block of the search")
    p.add_argument("--recall-sample", type=int, default=1000, help="ivf: queries checked against exact search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-plots", action="store_true")

    i = sub.add_parser("balance-inspect", help="a page of the largest merged groups (= `balance inspect`)")
    i.add_argument("--balance", required=True, help="balance output folder")
    i.add_argument("--data", required=True, help="the shards the embeddings were made from")
    i.add_argument("--out", required=True, help="HTML file to write")
    i.add_argument("--emb", default=None, help="embeddings folder (default: the one balance used)")
    i.add_argument("--top", type=int, default=24, help="how many groups")
    i.add_argument("--per-group", type=int, default=12, help="images shown per group")


def _add_cluster_parser(sub) -> None:
    p = sub.add_parser("cluster", help="spherical k-means of the kept teacher image embeddings")
    p.add_argument("--emb", required=True, help="teacher embeddings folder (clipcid embed)")
    p.add_argument("--balance", default=None, help="balance folder: cluster only the kept rows")
    p.add_argument("--k", default="auto", help="number of clusters, or auto (about 225 images per cluster)")
    p.add_argument("--out", required=True)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-points-per-centroid", type=int, default=256, help="training sample per centroid")
    p.add_argument(
        "--init",
        choices=["auto", "kmeans++", "random"],
        default="auto",
        help="seeding; auto = greedy k-means++ when affordable (n*k*d <= 2e10)",
    )
    p.add_argument("--nredo", type=int, default=1, help="restarts; the best objective is kept")
    p.add_argument(
        "--two-level",
        choices=["auto", "on", "off"],
        default="auto",
        help=f"coarse then fine k-means; auto = on above k = {65536:,}",
    )
    p.add_argument("--gpu", action="store_true", help="train k-means on the GPU (faiss-gpu)")
    p.add_argument("--no-plots", action="store_true")


DISTILL_HELP = {
    "data": "training shards (the ones the teacher embeddings were made from)",
    "teacher_emb": "teacher embeddings folder (clipcid embed)",
    "balance": "balance folder: train only on the kept rows",
    "clusters": "clusters folder (clipcid cluster): needed by the cluster-level terms",
    "out": "run folder: checkpoints, params.json, tensorboard, student.pt",
    "model": "student architecture (open_clip name or clipcid-tiny)",
    "resume": "latest, or a checkpoint folder",
    "w_clip": "weight of the student's own CLIP loss (0 turns it off)",
    "w_cls": "weight of cluster discrimination (cross-entropy on the pseudo-labels)",
    "w_kl": "weight of KL to the teacher's cluster distribution",
    "w_ins": "weight of instance-level teacher-student contrastive distillation",
    "w_simkd": "baseline: similarity-matrix distillation (open_clip style)",
    "w_fd": "baseline: feature distillation (CLIP-KD style MSE)",
    "pfc_sample_rate": "share of classes sampled per step (default 1.0, or 0.1 above 100k classes)",
    "precision": "fp32, bf16 or fp16 autocast (open_clip's amp_bf16 and amp are accepted too)",
    "lock_text": "freeze the text tower, LiT-style (a pretrained Hugging Face tower keeps its projection trainable)",
    "max_steps": "stop after this many steps (the schedule still spans the whole run)",
}


LIT_HELP = {
    "data": "training shards",
    "out": "run folder: features/ (the locked towers' features), model.pt, params.json, train_log.jsonl",
    "model": "a LiT architecture with shipped ImageNet weights (clipcid-lit-mobilenetv2, ...)",
    "feature_batch_size": "batch size of the feature pass over the corpus",
}
STUDY_HELP = {
    "out": "study folder: runs/, data/, study.json, study.md, study.csv, study.png",
    "plan": "plan JSON (default: the one shipped for the demo, clipcid/configs/study.json)",
    "demo": "a finished `clipcid demo` folder: its shards, teacher embeddings, balance, clusters, suite, recipe",
    "suite_root": "held-out suite (clipcid data build-eval)",
    "seeds": "seeds to run (default: the plan's)",
    "only": "run only these variants",
    "quick": "the demo folder was made with --quick (take that recipe)",
}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, required: set[str], helps: dict[str, str]):
    """One --flag per dataclass field, typed from its annotation: the CLI stays a thin layer."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=f.default, help=helps.get(f.name))
            continue
        if kind.startswith("list["):
            item = {"list[int]": int, "list[float]": float}.get(kind, str)
            parser.add_argument(flag, nargs="+", type=item, default=f.default, help=helps.get(f.name))
            continue
        convert = {"int": int, "float": float}.get(kind, str)
        if f.name in required:
            parser.add_argument(flag, required=True, type=convert, help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=convert, default=f.default, help=helps.get(f.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcid", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parser(sub)
    _add_embed_parser(sub)
    _add_eval_parsers(sub)
    _add_balance_parsers(sub)
    _add_cluster_parser(sub)
    from clipcid.distill.train import DistillConfig

    distill = sub.add_parser("distill", help="train a student: CLIP loss + cluster-level + instance-level distillation")
    add_dataclass_arguments(distill, DistillConfig, {"data", "out", "model"}, DISTILL_HELP)
    from clipcid.lit import LitConfig

    lit = sub.add_parser("lit", help="train a LiT teacher: projections on the locked pretrained towers' features")
    add_dataclass_arguments(lit, LitConfig, {"data", "out"}, LIT_HELP)
    from clipcid.study import StudyConfig

    study = sub.add_parser("study", help="student variants x seeds on one set of artifacts, with error bars")
    add_dataclass_arguments(study, StudyConfig, {"out"}, STUDY_HELP)
    models = sub.add_parser("models", help="list the project's model configs with parameter counts")
    models.add_argument("--all", action="store_true", help="list every open_clip architecture too")
    demo = sub.add_parser("demo", help="run the pipeline end to end on the embedded offline corpus")
    demo.add_argument("--out", default="demo")
    demo.add_argument("--quick", action="store_true", help="a small slice, for a smoke run")
    demo.add_argument("--workers", type=int, default=_default_workers())
    demo.add_argument("--npm-root", default="node_modules")
    demo.add_argument("--recipe", default=None, help="settings JSON (default: clipcid/configs/demo.json)")
    demo.add_argument("--study", action="store_true", help="then run `clipcid study` with the shipped plan")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "data" and args.data_command == "build-demo":
        from clipcid.corpus.build import BuildDemoConfig, build_demo_corpus, summary_table

        summary = build_demo_corpus(
            BuildDemoConfig(
                args.out,
                args.image_size,
                args.limit,
                args.shard_size,
                args.workers,
                args.seed,
                args.npm_root,
                args.allow_missing,
            )
        )
        print(summary_table(summary))
        print(f"{summary['written']} pairs in {summary['shards']} shards at {args.out}")
    elif args.command == "data" and args.data_command == "build-eval":
        from clipcid.corpus.build import format_table
        from clipcid.corpus.eval_suite import build_eval_suite

        infos = build_eval_suite(args.out, args.image_size, args.npm_root, args.workers, args.only)
        rows = [
            [
                i["name"],
                ",".join(i["tasks"]),
                i["classes"] or "",
                " ".join(f"{k}={v}" for k, v in i["splits"].items()),
                i["failed_to_render"],
            ]
            for i in infos
        ]
        print(format_table(["dataset", "tasks", "classes", "images", "failed"], rows))
    elif args.command == "embed":
        from clipcid.embed import EmbedConfig, embed

        summary = embed(
            EmbedConfig(
                data=args.data,
                model=args.model,
                out=args.out,
                pretrained=args.pretrained,
                batch_size=args.batch_size,
                precision=args.precision,
                workers=args.workers,
                device=args.device,
                rows_per_part=args.rows_per_part,
                image_column=args.image_column,
                caption_column=args.caption_column,
                seed=args.seed,
            )
        )
        if summary:
            print(
                f"{summary['rows']} rows, {summary['invalid']} invalid, dim {summary['dim']}, "
                f"{summary['parts']} part(s) in {args.out}"
            )
    elif args.command == "eval":
        from clipcid.evaluation.run import EvalConfig, run_eval

        if args.fewshot_k is not None and args.fewshot_k < 1:
            raise ClipcidError("--fewshot-k must be at least 1")
        records = run_eval(
            EvalConfig(
                model=args.model,
                pretrained=args.pretrained,
                dataset=args.dataset,
                task=args.task,
                output=args.output,
                batch_size=args.batch_size,
                templates=args.templates,
                classnames=args.classnames,
                fewshot_k=args.fewshot_k,
                feature_root=args.feature_root,
                suite_root=args.suite_root,
                workers=args.workers,
                device=args.device,
                precision=args.precision,
                seed=args.seed,
            )
        )
        for record in records:
            print(json.dumps(record))
    elif args.command == "eval-suite":
        from clipcid.evaluation.run import run_eval_suite

        run_eval_suite(
            args.model,
            args.pretrained,
            args.out,
            args.suite_root,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            precision=args.precision,
            feature_root=args.feature_root,
            only=args.only,
        )
        print((Path(args.out) / "summary.md").read_text())
    elif args.command == "balance":
        from clipcid.balance.run import BalanceConfig, balance, summary_text

        stats = balance(
            BalanceConfig(
                emb=args.emb,
                out=args.out,
                threshold=args.threshold,
                metric=args.metric,
                target_removal=args.target_removal,
                search=args.search,
                nlist=args.nlist,
                nprobe=args.nprobe,
                memory_gb=args.memory_gb,
                recall_sample=args.recall_sample,
                seed=args.seed,
                device=args.device,
                plots=not args.no_plots,
            )
        )
        if stats:
            print(summary_text(stats))
    elif args.command == "balance-inspect":
        from clipcid.balance.inspect import inspect_balance

        n = inspect_balance(args.balance, args.data, args.out, args.emb, args.top, args.per_group)
        print(f"{n} groups written to {args.out}")
    elif args.command == "cluster":
        from clipcid.cluster.run import ClusterConfig, cluster, summary_text

        stats = cluster(
            ClusterConfig(
                emb=args.emb,
                out=args.out,
                k=args.k,
                balance=args.balance,
                niter=args.niter,
                seed=args.seed,
                max_points_per_centroid=args.max_points_per_centroid,
                init=args.init,
                nredo=args.nredo,
                two_level=args.two_level,
                gpu=args.gpu,
                plots=not args.no_plots,
            )
        )
        if stats:
            print(summary_text(stats))
    elif args.command == "distill":
        import dataclasses

        from clipcid.distill.train import DistillConfig, distill

        fields = {f.name for f in dataclasses.fields(DistillConfig)}
        result = distill(DistillConfig(**{k: v for k, v in vars(args).items() if k in fields}))
        if result.get("last"):
            print(f"{result['steps']} steps; last: " + ", ".join(f"{k} {v:.4f}" for k, v in result["last"].items()))
    elif args.command in ("lit", "study"):
        import dataclasses

        from clipcid.lit import LitConfig, lit
        from clipcid.study import StudyConfig, run_study

        config, stage = {"lit": (LitConfig, lit), "study": (StudyConfig, run_study)}[args.command]
        names = {f.name for f in dataclasses.fields(config)}
        result = stage(config(**{k: v for k, v in vars(args).items() if k in names}))
        if args.command == "study":
            print((Path(args.out) / "study.md").read_text())
        else:
            print(f"LiT teacher in {args.out}: {result['train_rows']} rows, final loss {result['final_loss']:.4f}")
    elif args.command == "models":
        from clipcid.models import describe_models

        print(describe_models(include_all=args.all))
    elif args.command == "demo":
        from clipcid.demo import DemoConfig, run_demo

        result = run_demo(
            DemoConfig(
                out=args.out,
                quick=args.quick,
                workers=args.workers,
                npm_root=args.npm_root,
                recipe=args.recipe,
                study=args.study,
            )
        )
        for name, seconds in result["timings"].items():
            print(f"{name:<20} {seconds:8.1f} s")
        print(f"report: {result['report']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["balance", "inspect"]:  # `clipcid balance inspect` reads better than a separate name
        argv = ["balance-inspect", *argv[2:]]
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return run(args)
    except ClipcidError as e:
        print(f"clipcid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipcid: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
