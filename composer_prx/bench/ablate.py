"""python -m composer_prx.bench ablate: each technique over an AdamW baseline, and all of them, at an equal budget.

Every arm trains yamls/shapes.yaml (the quickstart's model and data, one 32 px stage) for the same
wall-clock budget (`--seconds`, callback `time_budget`) or the same number of batches (`--batches`), then
ShapesEval scores the held-out prompts; each arm runs every seed:

    arm = baseline (AdamW; no EMA, TREAD, REPA, perceptual loss) + its techniques
    table row = arm | batches in the budget | ShapesEval 1-/2-object scores, mean ± std over seeds | wall s

One more arm, "recipe in miniature", is yamls/quickstart.yaml itself (two stages, 16 px then 32 px, with its
Muon, EMA, TREAD, REPA, RoPE and time-shift settings) under the same wall-clock budget: the recipe as the
quickstart runs it, against the baseline. Its stages fix its batches, so `--batches` does not run it.

A finished (arm, seed) leaves OUT/results/ARM-sSEED.json and is kept, not rerun, so an interrupted
ablation resumes where it stopped. REPA and the DINO perceptual loss use the shapes stand-in teacher
(python -m composer_prx.data.shapes_teacher), trained once for a fixed number of steps. LPIPS needs
torchvision's ImageNet VGG16 (`--lpips-backbone`); without that file +lpips is reported as not run and the
full recipe runs without LPIPS under its own name ("full recipe without LPIPS"), so its result is never mistaken
for (or kept in place of) the full one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHAPES = Path(__file__).resolve().parents[2] / "yamls" / "shapes.yaml"
QUICKSTART = SHAPES.with_name("quickstart.yaml")
# Each technique as the quickstart-scale settings it runs with; {teacher} / {lpips} are filled in at run time.
TECHNIQUES = {
    # Muon's lr tuned at this scale: with Moonlight's scaling its update RMS is 0.2 lr, so lr 1e-3 (the AdamW
    # baseline's) moves the matrices ~5x less than AdamW does; 5e-3 with Adam at 1e-3 (README, the ablation)
    "muon": ["optimizer.name=muon", "optimizer.lr=5.0e-3", "optimizer.adam_lr=1.0e-3"],
    "ema": ["algorithms.ema={half_life: null, smoothing: 0.995, update_interval: 1ba}"],
    "tread": ["algorithms.tread={route_start: 1, route_end: -2, ratio: 0.5}"],
    "repa": ["algorithms.repa={teacher: '{teacher}', block: 1, weight: 0.5, hidden: 256}"],
    "lpips": ["algorithms.lpips={weight: 0.1, net: vgg, backbone_path: '{lpips}', resolution: null}"],
    "dino": ["algorithms.dino_perceptual={weight: 0.01, teacher: '{teacher}', resolution: null}"],
}
BASELINE = ["optimizer.name=adamw", *(f"algorithms.{name}=null" for name in
                                       ("ema", "tread", "repa", "lpips", "dino_perceptual"))]
MINIATURE = "recipe in miniature"  # yamls/quickstart.yaml as it is (its techniques listed for reference)
ARMS = {"baseline": [], **{f"+{name}": [name] for name in TECHNIQUES}, "full recipe": list(TECHNIQUES),
        MINIATURE: ["muon", "ema", "tread", "repa"]}
# PRX Part 2's FID change when the technique is added (lower is better), for the table's last column.
PRX_FID_DELTA = {"+muon": "−2.65", "+repa": "−3.56", "+tread": "+3.41 (256 px) / −3.32 (1024 px)"}
SCORES = [("1obj", "colour"), ("1obj", "position"), ("1obj", "shape"), ("1obj", "all"), ("2obj", "all")]


NO_LPIPS = "full recipe without LPIPS"
ALL_ARMS = {**{a: t for a, t in ARMS.items() if a != MINIATURE},
            NO_LPIPS: [name for name in ARMS["full recipe"] if name != "lpips"], MINIATURE: ARMS[MINIATURE]}


def planned_arms(requested: list[str], has_lpips: bool, backbone: str | None = None,
                 by_batches: bool = False) -> tuple[list[str], dict[str, str]]:
    """The arms to run (ALL_ARMS order) and the ones skipped with why: without an LPIPS backbone
    +lpips is skipped and the full recipe runs as NO_LPIPS; at equal batches the recipe in miniature is
    skipped (its stages set its batches)."""
    skipped = {}
    if by_batches and MINIATURE in requested:
        skipped[MINIATURE] = "its stages fix its batches; compare it at equal --seconds"
    requested = [a for a in requested if a not in skipped]
    if has_lpips:
        return [a for a in ARMS if a in requested], skipped
    wanted = {NO_LPIPS if a == "full recipe" else a for a in requested} - {"+lpips"}
    if "+lpips" in requested:
        skipped["+lpips"] = (f"no LPIPS backbone at --lpips-backbone {backbone}" if backbone else
                             "no LPIPS backbone (pass --lpips-backbone with torchvision's vgg16-397923af.pth)")
    return [a for a in ALL_ARMS if a in wanted], skipped


def arm_config(arm: str) -> Path:
    """The yaml an arm trains: the quickstart for the recipe in miniature, yamls/shapes.yaml for the others."""
    return QUICKSTART if arm == MINIATURE else SHAPES


def arm_overrides(arm: str, teacher: str, lpips: str | None) -> list[str]:
    """The dotlist of one arm over yamls/shapes.yaml: the baseline, then each of its techniques' settings
    (none for the recipe in miniature, whose yaml sets them)."""
    if arm == MINIATURE:
        return []
    out = list(BASELINE)
    for name in ALL_ARMS[arm]:
        out += [o.replace("{teacher}", teacher).replace("{lpips}", lpips or "") for o in TECHNIQUES[name]]
    return out


def run_name(arm: str, seed: int) -> str:
    return f"{arm.strip('+').replace(' ', '_')}-s{seed}"


def run_overrides(arm: str, seed: int, seconds: float | None, out: Path, data_root: str, teacher: str,
                  lpips: str | None, extra: list[str], batches: int | None = None) -> list[str]:
    """The full dotlist of one (arm, seed) run over its `arm_config` (also the key a kept result must match)."""
    clock = [f"callbacks.time_budget={{seconds: {seconds}}}"]
    if batches:
        budget = [f"trainer.max_duration={batches}ba"]
    else:  # the recipe in miniature stops at the budget or at the end of its stages, whichever comes first
        budget = clock if arm == MINIATURE else ["trainer.max_duration=1000000ba", *clock]
    return [f"variables.data_root={data_root}", f"run_dir={out}/runs", f"run_name={run_name(arm, seed)}",
            f"seed={seed}", *budget, "trainer.save_interval=1000000ba", "trainer.progress_bar=false",
            "callbacks.samples=null", *arm_overrides(arm, teacher, lpips), *extra]


def run_arm(arm: str, seed: int, overrides: list[str], path: Path, seconds: float | None,
            batches: int | None = None) -> dict:
    """Train one (arm, seed) in this process with its `run_overrides`, score it, write its result to `path`."""
    from composer_prx import train

    start = time.perf_counter()
    trainer = train.main([str(arm_config(arm)), *overrides])
    wall = time.perf_counter() - start
    callbacks = {type(cb).__name__: cb for cb in trainer.state.callbacks}
    result = {"arm": arm, "seed": seed, "seconds": None if batches else seconds,
              "batches": int(trainer.state.timestamp.batch), "wall_s": round(wall, 1),
              "scores": callbacks["ShapesEval"].results, "overrides": overrides}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def kept_result(path: Path, overrides: list[str]) -> dict | None:
    """A finished run's result if it ran with exactly these overrides; None (rerun it) if absent or stale."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("overrides") != overrides:
        log.warning("%s was run with other settings (the arm or --set changed); rerunning it", path)
        return None
    return result


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def table(results: dict[str, list[dict]], skipped: dict[str, str], budget: str) -> str:
    """Markdown: one row per arm (ARMS order, then the no-LPIPS recipe), scores as mean ± std over the seeds that ran."""
    head = ["arm", "seeds", f"batches ({budget})", "1-obj colour", "1-obj position", "1-obj shape",
            "1-obj all right", "2-obj all right", "wall s / seed", "PRX Part 2 FID Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in ALL_ARMS:
        if arm in skipped:
            lines.append(f"| {arm} | not run: {skipped[arm]} |" + " |" * (len(head) - 2))
            continue
        runs = results.get(arm, [])
        if not runs:
            continue
        cells = [arm, str(len(runs)), mean_std([r["batches"] for r in runs]).replace(".00", "")]
        cells += [mean_std([r["scores"][k][s] for r in runs if not math.isnan(r["scores"][k][s])]) for k, s in SCORES]
        cells += [f"{statistics.mean(r['wall_s'] for r in runs):.0f}", PRX_FID_DELTA.get(arm, "—")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m composer_prx.bench ablate", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="training wall-clock budget per run")
    parser.add_argument("--batches", type=int, default=None, help="equal steps instead: train every run this long")
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 18, 19])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"subset of {list(ARMS)} (the full recipe "
                        f"runs as '{NO_LPIPS}' without --lpips-backbone)")
    parser.add_argument("--out", default="./runs/ablate", help="results (kept across reruns) and the table")
    parser.add_argument("--data-root", default="./data/shapes")
    parser.add_argument("--teacher-steps", type=int, default=80, help="training steps of the shapes stand-in teacher")
    parser.add_argument("--lpips-backbone", default=None, help="torchvision vgg16-397923af.pth for the LPIPS arms")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {list(ARMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out) / (f"{args.batches}ba" if args.batches else f"{args.seconds:g}s")  # one budget per folder
    teacher = str(Path(args.data_root) / "teacher")
    if any(set(ARMS[a]) & {"repa", "dino"} for a in args.arms):
        from composer_prx.data.shapes_teacher import ensure_shapes_teacher

        ensure_shapes_teacher(args.data_root, args.teacher_steps)  # before any arm, outside their budgets
    has_lpips = args.lpips_backbone is not None and Path(args.lpips_backbone).is_file()
    arms, skipped = planned_arms(args.arms, has_lpips, args.lpips_backbone, by_batches=args.batches is not None)
    results: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in args.seeds:
            path = out / "results" / f"{run_name(arm, seed)}.json"
            overrides = run_overrides(arm, seed, args.seconds, out, args.data_root, teacher, args.lpips_backbone,
                                      args.set, args.batches)
            result = kept_result(path, overrides)
            if result is not None:
                log.info("kept %s seed %d from %s", arm, seed, path)
            else:
                result = run_arm(arm, seed, overrides, path, args.seconds, args.batches)
            results.setdefault(arm, []).append(result)
    text = table(results, skipped, f"{args.batches} per run" if args.batches else f"in {args.seconds:g} s")
    (out / "ablate.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "ablate.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
