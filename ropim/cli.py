"""ropim COMMAND: pre-train, compare, reproduce, evaluate, report, benchmark, list.

Every user mistake ends in one "error:" line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from ropim.harness.errors import CheckpointError, ConfigError, DataError, TrainingError
from ropim.harness.preemption import Preempted

# Help shared by several commands' options.
RESULTS_HELP = (
    "CSV of result rows (appended to; not tracked by git, reference rows: results/reference.csv)"
)
REPORTS_HELP = "folder for the table, its CSVs and figures"
METHOD_DIR_HELP = "extra folder holding <method>.py files (repeatable)"
OVERRIDES_HELP = "key.sub=value overrides of the config, e.g. train.epochs=5"


def _parser() -> argparse.ArgumentParser:
    from ropim.harness.records import package_version

    parser = _Parser(prog="ropim", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"ropim-bench {package_version() or 'unknown'}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pre-train one masking method")
    pre.add_argument(
        "--config", "-c", required=True, help="a YAML file or a bundled preset name (ropim configs)"
    )
    pre.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    pre.add_argument("--method-dir", action="append", default=[], help=METHOD_DIR_HELP)
    pre.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    pre.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    comp = sub.add_parser("compare", help="pre-train several methods under one shared budget")
    comp.add_argument(
        "--config", "-c", required=True, help="a comparison config, e.g. configs/compare_mnist.yaml"
    )
    comp.add_argument(
        "--methods", help="comma-separated subset of compare.methods (random_init: the floor)"
    )
    comp.add_argument("--dry-run", action="store_true", help="check the budget and list the runs")
    comp.add_argument("--method-dir", action="append", default=[], help=METHOD_DIR_HELP)
    comp.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    comp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    rep = sub.add_parser("reproduce", help="pre-train, evaluate and report a comparison")
    rep.add_argument("--config", "-c", required=True, help="e.g. configs/table2_smoke.yaml")
    rep.add_argument("--results", default="results/results.csv", help=RESULTS_HELP)
    rep.add_argument("--reports", default="reports", help=REPORTS_HELP)
    rep.add_argument("--method-dir", action="append", default=[], help=METHOD_DIR_HELP)
    rep.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    rep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pub = sub.add_parser(
        "published", help="the authors' released checkpoints through every task, vs. their papers"
    )
    pub.add_argument("--config", "-c", default="published_checkpoints", help="a published preset")
    pub.add_argument("--checkpoints", required=True, help="folder holding the downloaded files")
    pub.add_argument("--results", default="results/results.csv", help=RESULTS_HELP)
    pub.add_argument("--reports", default="reports", help=REPORTS_HELP)
    pub.add_argument("overrides", nargs="*", help="e.g. data.root=... segmentation.root=...")
    rp = sub.add_parser("report", help="tables and figures from results/ (no training)")
    rp.add_argument("--config", "-c", required=True, help="e.g. configs/table2_smoke.yaml")
    rp.add_argument("--results", default="results/results.csv", help=RESULTS_HELP)
    rp.add_argument("--reports", default="reports", help=REPORTS_HELP)
    rp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ev = sub.add_parser("evaluate", help="downstream tasks on pre-trained runs")
    ev.add_argument(
        "runs",
        nargs="*",
        help="pre-training run directories, and key=value overrides as every command takes",
    )
    ev.add_argument(
        "--weights",
        action="append",
        default=[],
        help="an encoder not trained here: an author's .pth/.safetensors file (MAE, SimMIM, "
        "BEiT or ROPIM layout; the architecture from the config's model section), "
        "local-dir:PATH (a timm folder), timm:NAME or hf-hub:ORG/NAME (cached; never downloaded)",
    )
    ev.add_argument(
        "--layout",
        help="the checkpoint file's key layout: mae, simmim (also ROPIM's), beit or timm "
        "(default: detected from its keys)",
    )
    ev.add_argument("--name", help="the method name the imported weights' rows carry")
    ev.add_argument(
        "--task",
        action="append",
        help="a task from `ropim tasks` (default: those that always run); repeat for several",
    )
    ev.add_argument("--config", "-c", help="YAML with the tasks' sections (e.g. a table2 preset)")
    ev.add_argument("--results", default="results/results.csv", help="CSV the rows append to")
    ev.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="<task>.key=value, e.g. classification.linear.epochs=10",
    )
    bp = sub.add_parser(
        "bench-pretrain", help="step speed per method, with each method's ablations"
    )
    bp.add_argument("--config", "-c", required=True, help="a comparison config")
    bp.add_argument("--steps", type=_positive, default=10, help="timed steps per method")
    bp.add_argument("--out", default="results/bench", help="folder for the CSV of the numbers")
    bp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    bd = sub.add_parser(
        "bench-data", help="views/s of the JPEG data path per core and with workers"
    )
    bd.add_argument("--folder", default="runs/bench_data", help="where the JPEGs are made once")
    bd.add_argument("--img-size", type=_positive, default=224, help="view size in pixels")
    bd.add_argument("--count", type=_positive, default=200, help="JPEGs to time")
    bd.add_argument(
        "--jpeg-size",
        default="500x375",
        help="the JPEGs' WIDTHxHEIGHT (500x375: ImageNet's most common; a short side of 448 "
        "or more lets a 224-px view decode at reduced scale)",
    )
    bd.add_argument("--workers", type=_positive, default=None, help="default: all cores")
    bd.add_argument("--config", "-c", help="also: loader rate / this config's training step rate")
    bd.add_argument("overrides", nargs="*", help="for --config, e.g. train.batch_size=16")
    bl = sub.add_parser(
        "bench-loop", help="the harness's images/s next to a plain PyTorch loop's (A/B rounds)"
    )
    bl.add_argument("--config", "-c", required=True, help="a single-run config")
    bl.add_argument("--steps", type=_positive, default=60, help="steps per timed run")
    bl.add_argument("--rounds", type=_positive, default=2, help="A/B rounds (harness, plain)")
    bl.add_argument("--folder", default="runs/bench_loop", help="scratch folder for the runs")
    bl.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    bdn = sub.add_parser(
        "bench-dense", help="one ViTDet (windowed vs. global) and UperNet iteration: time, memory"
    )
    bdn.add_argument(
        "--detection-size", type=_positive, default=1024, help="ViTDet input size (px)"
    )
    bdn.add_argument(
        "--segmentation-size", type=_positive, default=512, help="UperNet input size (px)"
    )
    bdn.add_argument("--depth", type=_positive, default=12, help="ViT blocks (12: ViT-B)")
    bdn.add_argument("--cap-gib", type=float, default=18.0, help="memory cap per variant")
    bdn.add_argument(
        "--variants", nargs="+", help="vitdet_windowed, vitdet_global, upernet (default: all)"
    )
    bench = sub.add_parser("bench-step", help="time training steps (images/s, peak memory)")
    bench.add_argument("--config", "-c", required=True, help="a single-run config")
    bench.add_argument("--steps", type=_positive, default=10, help="timed steps")
    bench.add_argument("--warmup", type=_non_negative, default=3, help="untimed steps first")
    bench.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    gpu = sub.add_parser("gpu-check", help="on a CUDA machine: paper-scale step speeds, resume")
    gpu.add_argument("--out", default="results/gpu_check", help="folder for the JSON and CSV")
    gpu.add_argument("--steps", type=_positive, default=20, help="timed steps per method")
    ex = sub.add_parser("export", help="a run's encoder as a timm model folder (local-dir:, Hub)")
    ex.add_argument("run", help="a pre-training run directory")
    ex.add_argument("out", help="new folder to write")
    ex.add_argument("--results", default="results/results.csv", help="scores for the model card")
    cd = sub.add_parser(
        "check-data", help="scan an image folder (PATH, or the config's data.root) before training"
    )
    cd.add_argument(
        "--config", "-c", help="a config whose data.root (and data.split) to scan, if no PATH"
    )
    cd.add_argument(
        "--workers", type=_positive, default=None, help="processes (default: all cores)"
    )
    cd.add_argument(
        "overrides",
        nargs="*",
        metavar="PATH | key=value",
        help="a folder to scan (holding train/ and val/, or class folders itself); key=value "
        "overrides for --config",
    )
    sub.add_parser("tasks", help="list the downstream tasks, their protocols and metrics")
    cfgs = sub.add_parser(
        "configs", help="list the bundled presets (--config NAME finds them), or print one"
    )
    cfgs.add_argument("name", nargs="?", help="a preset or file: print it resolved (base merged)")
    cfgs.add_argument("overrides", nargs="*", help="key=value applied before printing")
    docs = sub.add_parser("docs", help="list the documentation pages, or print one")
    docs.add_argument("page", nargs="?", help="a page name from the list, e.g. recipes")
    docs.add_argument("--path", action="store_true", help="print the page's file path instead")
    slurm = sub.add_parser(
        "slurm", help="list the SLURM batch scripts (with requeue on pre-emption), or print one"
    )
    slurm.add_argument("script", nargs="?", help="single_node, multi_node or array")
    slurm.add_argument("--out", help="write the script to this file instead of printing it")
    recipes = sub.add_parser(
        "recipes", help="every method's settings per protocol, each with its source"
    )
    recipes.add_argument("--method", action="append", help="one method (repeat for several)")
    recipes.add_argument(
        "--protocol",
        action="append",
        help="pretrain, knn, linear, finetune, segmentation or detection (repeatable)",
    )
    recipes.add_argument("--config", "-c", help="resolve against a preset (its values win)")
    recipes.add_argument(
        "--devices", type=_positive, default=1, help="devices the lr and batch totals assume"
    )
    recipes.add_argument("overrides", nargs="*", help="key=value over the preset")
    recipes.add_argument(
        "--format", choices=("table", "csv"), default="table", help="a table, or CSV rows"
    )
    cost = sub.add_parser(
        "cost",
        help="each method's training FLOPs and the GPU-hours they imply, before submitting",
    )
    cost.add_argument("--config", "-c", required=True, help="e.g. configs/table2_published.yaml")
    cost.add_argument(
        "--devices", type=_positive, default=8, help="devices the total batch assumes"
    )
    cost.add_argument(
        "--images", type=_positive, default=None, help="images per epoch (default: ImageNet-1k's)"
    )
    cost.add_argument("--gpu", default="H100", help="card whose bf16 peak the hours assume")
    cost.add_argument(
        "--mfu", type=float, default=None, help="model-FLOPs utilisation (default: measured)"
    )
    cost.add_argument("overrides", nargs="*", help="key=value over the preset")
    methods = sub.add_parser("methods", help="list the masking methods that can be selected")
    methods.add_argument("--method-dir", action="append", default=[], help=METHOD_DIR_HELP)
    return parser


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one ``error:`` line, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be {low} or more")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with ``key=value`` overrides accepted anywhere on the line (argparse
    alone takes positionals only before the first option: ``evaluate RUN --task T k=v``)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        if overrides != extra or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "evaluate":  # its positionals hold run folders and overrides
            args.runs = [*args.runs, *overrides]
        else:
            args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help (0) or a usage mistake, already said in one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if getattr(args, "print_config", False):  # the mapping the command would read
            return _print_config(args.config, args.overrides)
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # SIGTERM/SIGUSR1: checkpoint written at a step boundary
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:  # a path that cannot be made or written, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"error: {exc.strerror or exc}{where}: check that the folder exists and is "
            f"writable and that the disk has room; finished work is kept",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        again = "the same command with --resume" if args.command == "pretrain" else "it again"
        print(
            f"error: interrupted; checkpoints written so far are kept: run {again} to continue "
            f"from the newest one",
            file=sys.stderr,
        )
        return 130


# One function per command, each the route from its arguments into the suite or the harness;
# the table at the end of the module dispatches to them.


def _pretrain(args: argparse.Namespace) -> int:
    from ropim.harness.config import load_config
    from ropim.harness.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    pretrain(cfg, resume=args.resume, method_dirs=tuple(args.method_dir))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from ropim.harness.registry import available_methods

    print("\n".join(available_methods(args.method_dir)))
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from ropim.suite.gpu_check import gpu_check

    summary = gpu_check(args.out, args.steps)
    resume = summary["resume"]
    gap = resume["max_abs_weight_difference"]
    print(
        f"resume on {summary['hardware']['cuda_devices'][0]}: identical weights "
        f"{resume['identical_weights']}, max difference {gap:.3g}"
    )
    print(f"written: {args.out}/gpu_check.json, {args.out}/bench.csv")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ropim.suite.export import export_run

    out = export_run(args.run, args.out, args.results)
    print(f"exported: {out} (timm.create_model('local-dir:{out}', pretrained=True))")
    return 0


def _configs(args: argparse.Namespace) -> int:
    if args.name:  # the resolved config, as runs read it
        return _print_config(args.name, args.overrides)
    from ropim.harness.config import bundled_presets

    for name, path in bundled_presets().items():
        lines = path.read_text().splitlines()
        about = next((line.lstrip("# ") for line in lines if line.startswith("#")), "")
        print(f"{name:<28} {about}")
    return 0


def _docs(args: argparse.Namespace) -> int:
    from ropim.suite.packaged import doc_page, doc_pages

    if not args.page:
        for name, title in doc_pages().items():
            print(f"{name:<24} {title}")
        print("ropim docs PAGE prints one (ropim docs PAGE --path: where it is)")
        return 0
    page = doc_page(args.page)
    print(page if args.path else page.read_text(), end="\n" if args.path else "")
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from ropim.suite.packaged import slurm_script, slurm_scripts

    if not args.script:
        for name, about in slurm_scripts().items():
            print(f"{name:<14} {about}")
        print("ropim slurm NAME > job.sbatch, then edit its #SBATCH lines (ropim docs clusters)")
        return 0
    text = slurm_script(args.script).read_text()
    if args.out:
        out = Path(args.out)
        if out.exists():  # a mistyped --out must not overwrite someone's file
            raise ConfigError(f"--out {out} exists; choose a new file name for the script")
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}: edit its #SBATCH lines, then sbatch {out}")
    else:
        print(text, end="")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from downstream.tasks import all_tasks

    for task in all_tasks():
        metrics = ", ".join(f"{c.protocol}/{c.metric}" for c in task.headlines)
        when = "always" if task.always else f"when the config has a {task.name} section"
        print(f"{task.name}: {metrics} ({when})")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from ropim.suite.recipes import format_card, recipe_card

    card = recipe_card(args.method, args.protocol, args.config, args.devices, args.overrides)
    print(format_card(card, args.format), end="" if args.format == "csv" else "\n")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from ropim.suite.cost import MEASURED_MFU, cost_rows, format_cost

    mfu = MEASURED_MFU if args.mfu is None else args.mfu
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be a share in (0, 1], e.g. 0.4")
    rows = cost_rows(args.config, args.overrides, args.devices, args.images, args.gpu, mfu)
    print(format_cost(rows))
    return 0


def _bench_dense(args: argparse.Namespace) -> int:
    from ropim.suite.bench_dense import VARIANTS, bench_dense

    for row in bench_dense(
        tuple(args.variants or VARIANTS),
        detection_size=args.detection_size,
        segmentation_size=args.segmentation_size,
        depth=args.depth,
        cap_gib=args.cap_gib,
    ):
        where = (
            f"{row['variant']:<16} {row['image']} px, {row['depth']} blocks, batch {row['batch']}:"
        )
        if "error" in row:
            print(f"{where} {row['error']}")
        else:
            print(
                f"{where} {row['seconds']:.1f} s per iteration, peak {row['peak_mib']:.0f}"
                f" MiB (model and optimiser {row['model_mib']:.0f} MiB before it)"
            )
    return 0


def _bench_step(args: argparse.Namespace) -> int:
    import json

    from ropim.harness.config import load_config
    from ropim.suite.bench import bench_step

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(bench_step(cfg, args.warmup, args.steps), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ropim.suite.reproduce import make_report

    make_report(args.config, args.overrides, args.results, args.reports)
    return 0


def _published(args: argparse.Namespace) -> int:
    from ropim.suite.published import evaluate_published

    evaluate_published(args.config, args.checkpoints, args.overrides, args.results, args.reports)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ropim.suite.reproduce import reproduce

    reproduce(args.config, args.overrides, args.results, args.reports, tuple(args.method_dir))
    return 0


def _print_config(path: str, overrides: list[str]) -> int:
    """The resolved config (base presets merged, overrides applied) as YAML."""
    import yaml

    from ropim.harness.config import apply_overrides, read_yaml

    raw = apply_overrides(read_yaml(path), overrides)
    print(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None), end="")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from ropim.harness.config import load_config
    from ropim.harness.data_check import check_folder, describe

    paths = [Path(a).expanduser() for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if len(paths) > 1 or (not paths and not args.config):
        raise ConfigError("ropim check-data takes one PATH (an image folder) or --config FILE")
    if paths:
        folders = _folders_to_check(paths[0])
    else:
        cfg = load_config(args.config, overrides)
        if cfg.data.dataset != "imagefolder":
            print(f"data.dataset={cfg.data.dataset}: bundled data, nothing to scan")
            return 0
        if not cfg.data.root:
            raise ConfigError("data.root is required for data.dataset=imagefolder")
        root = Path(cfg.data.root).expanduser()
        folders = [root / split for split in dict.fromkeys([cfg.data.split, "val"])]
    fatal = one_class = False
    for folder in folders:
        if folder.name == "val" and not folder.is_dir():
            print(f"{folder}: no validation split (downstream evaluation will need one)")
            continue
        report = check_folder(folder, args.workers)
        print("\n".join(describe(report)))
        fatal = fatal or report.fatal
        one_class = one_class or len(report.per_class) < 2
    if fatal:
        print(
            "error: the folder holds files or classes that would stop training: fix or remove "
            "them, or set data.on_bad_image=skip to leave bad files out (recorded per run)",
            file=sys.stderr,
        )
        return 1
    if one_class:
        print("ok: every image decodes, but there are fewer than 2 classes (see WARN above)")
        return 0
    print("ok: every image decodes")
    return 0


def _folders_to_check(path: Path) -> list[Path]:
    """A dataset root (its train/ and val/ splits) or one split folder of class folders."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give an image folder to scan")
    if (path / "train").is_dir():
        return [path / "train", path / "val"]
    return [path]


def _evaluate(args: argparse.Namespace) -> int:

    from downstream.tasks import all_tasks, task_named
    from ropim.harness.config import apply_overrides, read_yaml
    from ropim.suite.evaluate import evaluate_run

    overrides = [*(a for a in args.runs if "=" in a), *args.overrides]  # --set: an alias
    args.runs = [a for a in args.runs if "=" not in a]
    raw = read_yaml(args.config) if args.config else {}
    raw = apply_overrides(raw or {}, overrides)
    if not args.runs and not args.weights:
        raise ConfigError(
            "name run directories, or --weights FILE|local-dir:PATH|timm:NAME|hf-hub:ORG/NAME"
        )
    if args.weights and not args.config:
        raise ConfigError("--weights needs --config: its data section says what to evaluate on")
    run_dirs = list(args.runs)
    if args.weights:
        from ropim.suite.external import import_weights

        output_dir = (raw.get("run") or {}).get("output_dir", "runs")
        run_dirs += [
            import_weights(spec, raw, output_dir, args.name, args.layout) for spec in args.weights
        ]
    names = args.task or [t.name for t in all_tasks() if t.always]
    tasks = [task_named(name) for name in names]
    for task in tasks:
        settings = task.parse_settings(raw)
        headlines = {(c.protocol, c.metric) for c in task.headlines}
        for run_dir in run_dirs:
            for row in evaluate_run(task, run_dir, settings, args.results):
                if (row["protocol"], row["metric"]) in headlines:
                    print(
                        f"{row['run_id']}: {task.name} {row['protocol']} {row['metric']} "
                        f"{row['value']:.2%}",
                        flush=True,
                    )
    print(f"rows appended to {args.results}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from ropim.suite.bench_data import bench_data

    width, _, height = args.jpeg_size.partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) >= 8 and int(height) >= 8):
        raise ConfigError(f"--jpeg-size {args.jpeg_size!r} must be WIDTHxHEIGHT, e.g. 896x672")
    jpeg_size = (int(width), int(height))
    rows = bench_data(args.folder, args.img_size, args.count, args.workers, jpeg_size)
    for row in rows:
        print(
            f"{row['path']:>6} {row['view']}: loader {row['loader_per_core']:.0f} img/s/core, "
            f"decode-only "
            f"{row['decode_per_core']:.0f} img/s/core, ratio {row['ratio']:.2f}; "
            f"{row['workers']} workers {row['loader_total']:.0f} img/s"
        )
    for row in rows:
        if "dct_mean_abs" in row:
            print(
                f"scaled decode vs. full-scale decode of the same box, {row['view']}: mean "
                f"|Δ| {row['dct_mean_abs']:.2f} of 255, PSNR {row['dct_psnr_db']:.1f} dB, "
                f"{row['dct_differs']:.0%} of views differ (at {row['img_size']} px, JPEGs "
                f"{row['jpeg_size']})"
            )
    if args.config:
        from ropim.harness.config import load_config
        from ropim.suite.bench import bench_step

        step = bench_step(load_config(args.config, args.overrides), warmup=1, steps=2)
        best = max(row["loader_total"] for row in rows if row["path"] == "scaled")
        print(
            f"training step ({step['method']}, {step['model']}, batch {step['batch_size']}, "
            f"{step['device_name']}): {step['images_per_s']:.1f} img/s; scaled loader/step "
            f"{best / step['images_per_s']:.2f}"
        )
    return 0


def _bench_loop(args: argparse.Namespace) -> int:
    from ropim.harness.config import load_config
    from ropim.suite.bench import harness_vs_plain

    cfg = load_config(args.config, args.overrides)
    for row in harness_vs_plain(cfg, args.steps, Path(args.folder), args.rounds):
        print(
            f"round {row['round']}: harness {row['harness']:.0f} img/s, plain loop "
            f"{row['plain']:.0f} img/s, harness/plain {row['ratio']:.2f}"
        )
    return 0


def _bench_pretrain(args: argparse.Namespace) -> int:
    import pandas as pd

    from ropim.suite.bench import bench_pretrain, write_bench_table
    from ropim.suite.compare import plan_comparison

    planned = plan_comparison(args.config, args.overrides)
    table = pd.DataFrame(bench_pretrain(planned, steps=args.steps))
    path = write_bench_table(table, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        for measurement, group in table.groupby("measurement", sort=False):
            print(f"\n{measurement}:")
            print(
                group.dropna(axis=1, how="all").drop(columns="measurement").to_string(index=False)
            )
    print(f"\nwritten: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ropim.suite.compare import check_methods, plan_comparison, run_comparison, summarize

    methods = args.methods.split(",") if args.methods else None
    planned = plan_comparison(args.config, args.overrides, methods)
    for run in planned:
        print(f"{run.label}: {run.config.run.output_dir}/{run.config.run.name}")
    # Build each method once before anything trains: a misspelt method or a setting it cannot
    # take fails now, not after the other methods have trained.
    check_methods(planned, tuple(args.method_dir))
    if args.dry_run:
        print("ok: every method builds with its settings")
        return 0
    run_dirs = run_comparison(planned, tuple(args.method_dir))
    print(summarize(run_dirs))
    return 0


COMMANDS = {  # command -> its function
    "pretrain": _pretrain,
    "compare": _compare,
    "reproduce": _reproduce,
    "published": _published,
    "report": _report,
    "evaluate": _evaluate,
    "bench-pretrain": _bench_pretrain,
    "bench-data": _bench_data,
    "bench-loop": _bench_loop,
    "bench-dense": _bench_dense,
    "bench-step": _bench_step,
    "gpu-check": _gpu_check,
    "export": _export,
    "check-data": _check_data,
    "tasks": _tasks,
    "docs": _docs,
    "slurm": _slurm,
    "configs": _configs,
    "recipes": _recipes,
    "cost": _cost,
    "methods": _methods,
}


if __name__ == "__main__":
    sys.exit(main())
