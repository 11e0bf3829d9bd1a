"""Run every bundle's demo and write a report under ``reports/``.

Two settings per bundle:

- default: ``bundles/<bundle>/configs/demo.json``, short enough that all bundles together finish in
  well under 30 minutes on 2 idle CPU cores (each model card says how its model compares with its
  baseline);
- ``--full``: ``bundles/<bundle>/configs/demo_full.json``, the longer settings the model cards' "full
  demo" figures were measured with (about 100 minutes for all bundles on 2 CPU cores). A bundle without
  a demo_full.json runs its demo.json.

Each file lists shell-free commands with the placeholders ``{python}`` (this interpreter),
``{bundle}`` (the bundle folder), ``{data}`` (its demo data folder) and ``{work}`` (the folder that
receives its models, logs and outputs, used as ``bundle_root`` so the source tree stays clean), and a
``report`` section naming metric files and images, and optionally ``env``: environment variables for
every step (``{"OMP_NUM_THREADS": "1"}`` where the thread count changes results or speed). Logs of every step go to ``reports/<bundle>/logs``;
each finished step prints its wall-clock time and the running totals, and ``summary.json`` keeps per
step the wall-clock seconds, the CPU seconds of the step's process and the 1-minute load average at its
end (wall-clock time on shared cores is inflated; the load average says by how much).

    ./scripts/demo.sh                                    # default settings, every bundle
    ./scripts/demo.sh --full                             # the longer settings
    ./scripts/demo.sh --bundles pathology_wsss_deeplab   # one bundle
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_steps(name: str, spec: dict, values: dict[str, str], log_dir: Path, started: float) -> list[dict]:
    """Run the steps in order and print each one's time and the running totals (``started``: demo start)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    bundle_seconds = 0.0
    count = len(spec["steps"])
    environment = {**os.environ, **spec.get("env", {})}
    for index, step in enumerate(spec["steps"], start=1):
        command = [substitute(part, values) for part in step["command"]]
        log_file = log_dir / f"{index:02d}_{step['name'].replace(' ', '_')}.log"
        print(f"[{name}] {index}/{count} {step['name']} (log: {log_file})", flush=True)
        start = time.perf_counter()
        cpu_start = children_cpu_seconds()
        with open(log_file, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            result = subprocess.run(
                command, check=False, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT
            )
        seconds = time.perf_counter() - start
        cpu_seconds = children_cpu_seconds() - cpu_start
        load = os.getloadavg()[0]
        bundle_seconds += seconds
        timings.append(
            {
                "step": step["name"],
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_seconds, 1),
                "load_avg_1min": round(load, 2),
                "returncode": result.returncode,
            }
        )
        print(
            f"[{name}] {index}/{count} {step['name']}: {format_seconds(seconds)} "
            f"(CPU {format_seconds(cpu_seconds)}, load {load:.1f}); "
            f"{name} so far {format_seconds(bundle_seconds)}, "
            f"demo so far {format_seconds(time.perf_counter() - started)}",
            flush=True,
        )
        if result.returncode != 0:
            tail = log_file.read_text().splitlines()[-30:]
            raise SystemExit(f"[{name}] step '{step['name']}' failed ({result.returncode}); last lines of {log_file}:\n" + "\n".join(tail))
    return timings


def metrics_table(report: dict, values: dict[str, str]) -> tuple[list[str], list[dict]]:
    """One row per metrics file, with the ``columns`` the report asks for (those the file has)."""
    columns = report["columns"]
    rows = []
    for entry in report["metrics"]:
        path = Path(substitute(entry["file"], values))
        summary = json.loads(path.read_text())
        figures = {k: summary[k] for k in columns if isinstance(summary.get(k), (int, float))}
        rows.append({"name": entry["name"], "file": str(path), **figures})
    return columns, rows


def write_report(
    name: str, spec: dict, values: dict[str, str], timings: list[dict], report_dir: Path, settings: str
) -> dict:
    columns, rows = metrics_table(spec["report"], values)
    image_dir = report_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for pattern in spec["report"].get("images", []):
        for path in sorted(glob.glob(substitute(pattern, values)))[: spec["report"].get("max_images", 4)]:
            target = image_dir / Path(path).name
            shutil.copyfile(path, target)
            images.append(target.name)
    total = sum(t["seconds"] for t in timings)
    lines = [f"# {name}: demo report", "", f"Settings: `{settings}`.", "", spec.get("description", "")]
    lines += ["", "## Metrics", ""]
    lines += ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Steps", "", "| step | seconds | CPU seconds | load average (1 min) at its end |"]
    lines += ["|---|---|---|---|"]
    lines += [
        f"| {t['step']} | {t['seconds']} | {t.get('cpu_seconds', '-')} | {t.get('load_avg_1min', '-')} |"
        for t in timings
    ]
    lines += [f"| total | {total:.1f} ({total / 60:.1f} min) | | |"]
    lines += ["", "## Overlays", ""] + [f"![{img}](images/{img})" for img in images]
    (report_dir / "README.md").write_text("\n".join(lines) + "\n")
    summary = {
        "bundle": name,
        "settings": settings,
        "headline": spec["report"]["headline"],
        "metrics": rows,
        "steps": timings,
        "minutes": round(total / 60, 1),
        "images": images,
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_index(reports: Path) -> None:
    """reports/README.md: one row per bundle report present, including those of earlier runs."""
    index = ["# Demo reports", "", "| bundle | settings | headline metrics | minutes |", "|---|---|---|---|"]
    for summary_file in sorted(reports.glob("*/summary.json")):
        s = json.loads(summary_file.read_text())
        headline = "; ".join(
            f"{r['name']}: " + ", ".join(f"{k} {r[k]:.3f}" for k in s.get("headline", []) if isinstance(r.get(k), float))
            for r in s["metrics"]
        )
        minutes = sum(t["seconds"] for t in s["steps"]) / 60
        settings = s.get("settings", "-")
        link = f"[{s['bundle']}]({s['bundle']}/README.md)"
        index.append(f"| {link} | {settings} | {headline} | {minutes:.1f} |")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "README.md").write_text("\n".join(index) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="*", help="bundle names (default: every bundle with configs/demo.json)")
    parser.add_argument("--data-root", default="data", help="where demo data is written")
    parser.add_argument("--work-root", default="runs/demo", help="where demo models and outputs are written")
    parser.add_argument("--reports", default="reports", help="report folder")
    parser.add_argument("--report-only", action="store_true", help="rebuild the reports from an earlier run's outputs")
    parser.add_argument(
        "--full", action="store_true", help="longer settings: configs/demo_full.json where a bundle has one"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    bundle_dirs = sorted(p.parents[1] for p in (ROOT / "bundles").glob("*/configs/demo.json"))
    if args.bundles:
        bundle_dirs = [d for d in bundle_dirs if d.name in args.bundles]
        missing = set(args.bundles) - {d.name for d in bundle_dirs}
        if missing:
            raise SystemExit(f"no configs/demo.json for: {', '.join(sorted(missing))}")
    for bundle_dir in bundle_dirs:
        name = bundle_dir.name
        values = {
            "python": sys.executable,
            "bundle": str(bundle_dir.relative_to(ROOT)),
            "data": str(Path(args.data_root) / name),
            "work": str(Path(args.work_root) / name),
        }
        spec_file = bundle_dir / "configs" / "demo.json"
        if args.full and (bundle_dir / "configs" / "demo_full.json").is_file():
            spec_file = bundle_dir / "configs" / "demo_full.json"
        spec = json.loads(spec_file.read_text())
        settings = str(spec_file.relative_to(ROOT))
        report_dir = ROOT / args.reports / name
        if args.report_only:
            timings = json.loads((report_dir / "summary.json").read_text())["steps"]
        else:
            timings = run_steps(name, spec, values, report_dir / "logs", started)
        write_report(name, spec, values, timings, report_dir, settings)
        print(f"[{name}] report: {report_dir / 'README.md'}", flush=True)

    write_index(ROOT / args.reports)
    elapsed = format_seconds(time.perf_counter() - started)
    print(f"wrote {Path(args.reports) / 'README.md'} ({elapsed} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
