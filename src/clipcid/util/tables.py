"""Tables: Markdown (every .md the package writes), text for the terminal; and a process pool with a
progress bar (the corpus builders)."""

from __future__ import annotations

import multiprocessing as mp

from clipcid.util.progress import progress_bar


def markdown_table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A Markdown table's lines: the first `left` columns aligned left, the others right (numbers)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def format_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def run_pool(fn, jobs: list, workers: int, desc: str, unit: str, total: int):
    """Run jobs in worker processes (in this process when workers <= 1), yielding results as they end.

    Each result is a dict whose "count" says how many `unit`s the job did, for the progress bar.
    """
    with progress_bar(total, desc, unit) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                result = fn(job)
                bar.update(result["count"])
                yield result
            return
        # fork: workers only render with cairo/Pillow and need nothing re-imported.
        with mp.get_context("fork").Pool(workers) as pool:
            for result in pool.imap_unordered(fn, jobs):
                bar.update(result["count"])
                yield result
