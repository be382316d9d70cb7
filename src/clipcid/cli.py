"""The command line: a table of command -> (config dataclass, stage function, printer).

Every flag is generated from a field of the command's config (its help from the field's metadata,
clipcid/config.py), so each setting a stage has is reachable and its default is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipcid.errors import ClipcidError
from clipcid.util.allocator import keep_freed_memory
from clipcid.util.progress import setup_logging

log = logging.getLogger("clipcid")

DESCRIPTION = """clipcid makes small CLIP models learn from large ones (CLIP-CID: cluster-instance
discrimination distillation, Yang et al., AAAI 2025). `clipcid run --data SHARDS --teacher MODEL
--student ARCH --out DIR` runs the whole method on your image-text shards (hold-out, teacher
embeddings, Image Semantic Balance, clustering, distillation, evaluation, export, report); each
stage is also a command of its own. `clipcid COMMAND --help` lists a command's settings."""


@dataclass(frozen=True)
class Command:
    help: str
    config: Callable[[], type]  # imported on use: the heavy stages load torch and friends
    run: Callable[[], Callable]
    show: Callable[[object, object], None] = lambda result, cfg: None


def _lazy(module: str, name: str) -> Callable[[], object]:
    def load():
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


def _print_written(module: str, file_constant: str, folder: Callable) -> Callable:
    """A printer of the Markdown file a command wrote: the file's name is its owner module's constant."""

    def show(result, cfg) -> None:
        print((Path(folder(result, cfg)) / _lazy(module, file_constant)()).read_text())

    return show


def _print_corpus(summary, cfg) -> None:
    from clipcid.corpus.build import summary_table

    print(summary_table(summary))
    print(f"{summary['written']} pairs in {summary['shards']} shards at {cfg.out}")


def _print_suite(infos, cfg) -> None:
    from clipcid.util.tables import format_table

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


def _print_embed(summary, cfg) -> None:
    if summary:
        print(
            f"{summary['rows']} rows, {summary['invalid']} invalid, dim {summary['dim']}, "
            f"{summary['parts']} part(s) in {cfg.out}"
        )


def _print_stats(module: str) -> Callable:
    def show(stats, cfg) -> None:
        if stats:
            print(_lazy(module, "summary_text")()(stats))

    return show


def _print_distill(result, cfg) -> None:
    if result.get("last"):
        print(f"{result['steps']} steps; last: " + ", ".join(f"{k} {v:.4f}" for k, v in result["last"].items()))


def _print_demo(result, cfg) -> None:
    for name, seconds in result["timings"].items():
        print(f"{name:<20} {seconds:8.1f} s")
    print(f"report: {result['report']}")


COMMANDS: dict[str, Command] = {
    "run": Command(
        "the whole method on your shards: hold-out, embed, balance, cluster, distill, eval, export, report",
        _lazy("clipcid.pipeline", "RunConfig"),
        _lazy("clipcid.pipeline", "run_pipeline"),
        _print_demo,
    ),
    "holdout": Command(
        "set pairs aside by a hash of their image bytes, before any model runs (a retrieval gallery)",
        _lazy("clipcid.holdout", "HoldoutConfig"),
        _lazy("clipcid.holdout", "hold_out"),
        _print_stats("clipcid.holdout"),
    ),
    "data build-demo": Command(
        "render the training corpus into webdataset shards",
        _lazy("clipcid.corpus.build", "BuildDemoConfig"),
        _lazy("clipcid.corpus.build", "build_demo_corpus"),
        _print_corpus,
    ),
    "data build-web": Command(
        "a corpus with web-like near-copies (Zipf counts, re-encoded, cropped, recaptioned) of a built corpus",
        _lazy("clipcid.corpus.web", "BuildWebConfig"),
        _lazy("clipcid.corpus.web", "build_web_corpus"),
        _print_stats("clipcid.corpus.web"),
    ),
    "data web-check": Command(
        "balance's precision and recall at finding a web-like corpus's copies, against random removal",
        _lazy("clipcid.corpus.web", "WebCheckConfig"),
        _lazy("clipcid.corpus.web", "check_web_balance"),
        lambda result, cfg: print(_lazy("clipcid.corpus.web", "web_check_markdown")()(result)),
    ),
    "data build-eval": Command(
        "render the held-out evaluation suite (CLIP_benchmark wds layout)",
        _lazy("clipcid.corpus.eval_suite", "BuildEvalConfig"),
        _lazy("clipcid.corpus.eval_suite", "build_eval_suite"),
        _print_suite,
    ),
    "embed": Command(
        "compute teacher image and text embeddings once, offline",
        _lazy("clipcid.embed.run", "EmbedConfig"),
        _lazy("clipcid.embed.run", "embed"),
        _print_embed,
    ),
    "balance": Command(
        "Image Semantic Balance: drop semantic near-duplicates (`clipcid balance inspect` shows the largest groups)",
        _lazy("clipcid.balance.run", "BalanceConfig"),
        _lazy("clipcid.balance.run", "balance"),
        _print_stats("clipcid.balance.run"),
    ),
    "balance inspect": Command(
        "a page of the largest merged groups",
        _lazy("clipcid.balance.inspect", "InspectConfig"),
        _lazy("clipcid.balance.inspect", "inspect_balance"),
        lambda n, cfg: print(f"{n} groups written to {cfg.out}"),
    ),
    "cluster": Command(
        "spherical k-means of the kept teacher image embeddings",
        _lazy("clipcid.cluster.run", "ClusterConfig"),
        _lazy("clipcid.cluster.run", "cluster"),
        _print_stats("clipcid.cluster.run"),
    ),
    "lit": Command(
        "train a LiT teacher: projections on the locked pretrained towers' features",
        _lazy("clipcid.lit", "LitConfig"),
        _lazy("clipcid.lit", "lit"),
        lambda r, cfg: print(f"LiT teacher in {cfg.out}: {r['train_rows']} rows, final loss {r['final_loss']:.4f}"),
    ),
    "distill": Command(
        "train a student: CLIP loss + cluster-level + instance-level distillation",
        _lazy("clipcid.distill.train", "DistillConfig"),
        _lazy("clipcid.distill.train", "distill"),
        _print_distill,
    ),
    "eval": Command(
        "zero-shot classification, linear probe or retrieval on one dataset",
        _lazy("clipcid.evaluation.run", "EvalConfig"),
        _lazy("clipcid.evaluation.run", "run_eval"),
        lambda records, cfg: [print(json.dumps(r)) for r in records],
    ),
    "eval-suite": Command(
        "every task of the held-out suite, with summary.md and summary.csv",
        _lazy("clipcid.evaluation.run", "EvalSuiteConfig"),
        _lazy("clipcid.evaluation.run", "run_eval_suite"),
        _print_written("clipcid.evaluation.run", "SUMMARY_MARKDOWN", lambda result, cfg: cfg.out),
    ),
    "study": Command(
        "student variants x seeds on one set of artifacts, with error bars",
        _lazy("clipcid.study", "StudyConfig"),
        _lazy("clipcid.study", "run_study"),
        lambda result, cfg: print((Path(cfg.out) / f"{result['name']}.md").read_text()),
    ),
    "paper": Command(
        "the paper's tables in its order, with a verdict on each of its claims, from a study folder",
        _lazy("clipcid.paper", "PaperConfig"),
        _lazy("clipcid.paper", "write_paper"),
        _print_written("clipcid.paper", "PAPER_MARKDOWN", lambda result, cfg: cfg.out or cfg.study),
    ),
    "demo": Command(
        "run the pipeline end to end on the embedded offline corpus",
        _lazy("clipcid.demo", "DemoConfig"),
        _lazy("clipcid.demo", "run_demo"),
        _print_demo,
    ),
    "export": Command(
        "write a model folder that plain open_clip and CLIP_benchmark load (local-dir:OUT), with a model card",
        _lazy("clipcid.export", "ExportConfig"),
        _lazy("clipcid.export", "export_model"),
        lambda result, cfg: print(
            f"exported to {result['out']}: open_clip.create_model_and_transforms('local-dir:{result['out']}')"
        ),
    ),
    "models": Command(
        "list the project's model configs with parameter counts",
        _lazy("clipcid.models", "ModelsConfig"),
        _lazy("clipcid.models", "describe_models"),
        lambda text, cfg: print(text),
    ),
}


def _flag_type(annotation: str) -> tuple[str, Callable | None]:
    kind = annotation.replace(" | None", "").strip()
    if kind == "bool":
        return "bool", None
    if kind.startswith("list["):
        return "list", {"list[int]": int, "list[float]": float}.get(kind, str)
    return "value", {"int": int, "float": float}.get(kind, str)


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """One --flag per field of `config`, typed from its annotation, helped by its metadata."""
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help") or None
        choices = f.metadata.get("choices")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind, convert = _flag_type(str(f.type))
        if kind == "bool":
            # A bool that may be left unset (None: a recipe decides) takes --flag and --no-flag.
            optional = default is None or default
            action = argparse.BooleanOptionalAction if optional else "store_true"
            parser.add_argument(flag, action=action, default=default, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, nargs="+", type=convert, default=default, required=required, help=help_text)
        else:
            parser.add_argument(flag, type=convert, default=default, required=required, choices=choices, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcid", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if tail and head == "data":
            if head not in groups:
                group = sub.add_parser(head, help="build the offline corpus and the held-out evaluation suite")
                groups[head] = group.add_subparsers(dest="subcommand", required=True)
            p = groups[head].add_parser(tail, help=command.help)
        else:
            p = sub.add_parser(name.replace(" ", "-"), help=command.help)
        add_config_arguments(p, command.config())
        p.set_defaults(command_name=name)
    return parser


def run(args: argparse.Namespace) -> int:
    from clipcid.config import validate

    command = COMMANDS[args.command_name]
    config = command.config()
    names = {f.name for f in dataclasses.fields(config)}
    cfg = config(**{k: v for k, v in vars(args).items() if k in names})
    validate(cfg)  # every number within its bounds, one line otherwise, before anything starts
    command.show(command.run()(cfg), cfg)
    return 0


def one_line(message: str) -> str:
    """A DataLoader worker's error arrives wrapped in its traceback text: keep the message itself."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split("Error: ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["balance", "inspect"]:  # `clipcid balance inspect` reads better than a separate name
        argv = ["balance-inspect", *argv[2:]]
    # CLIP_benchmark spells flags with underscores (--dataset_root, --batch_size); take both spellings.
    argv = [a.replace("_", "-") if a.startswith("--") and "=" not in a else a for a in argv]
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    keep_freed_memory()  # before any tensor: large activations stay mapped between batches (util/allocator.py)
    try:
        return run(args)
    except ClipcidError as e:
        if args.debug:
            raise
        print(f"clipcid: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder without permission...: nothing half was written (atomic writes)
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"clipcid: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipcid: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a library's error we did not foresee: still one line
        if args.debug:
            raise
        text = one_line(str(e)).strip().splitlines()
        detail = f": {text[0][:300]}" if text else ""
        print(
            f"clipcid: error: unexpected {type(e).__name__}{detail} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
