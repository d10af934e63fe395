"""Command line: ``python -m shadowlab {train,evaluate,data,...}``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from shadowlab import allocator, checkpoints, validate
from shadowlab.cli.args import add_data_args, add_resume_args, parse_eps, parse_run
from shadowlab.cli.commands import (
    cmd_bench,
    cmd_certify_crown_ibp,
    cmd_certify_smoothing,
    cmd_cost,
    cmd_data,
    cmd_evaluate,
    cmd_import_checkpoint,
    cmd_rejudge,
    cmd_reproduce,
    cmd_train,
)
from shadowlab.data import DataError
from shadowlab.defenses.train import DEFENSES, INIT_SCHEMES, LR_SCHEDULES
from shadowlab.experiments.settings import PRUNED, Table1Settings, Table2Settings
from shadowlab.perception import MIN_SSIM
from shadowlab.precision import PRECISIONS
from shadowlab.shadow.config import RECIPES


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit status 2 (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)} (--help for the options)\n")


def one_line(message: object) -> str:
    """A message on one line: its lines joined, whitespace collapsed."""
    return " ".join(str(message).split())


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m shadowlab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model and write a checkpoint with its metrics")
    t.add_argument("--arch", default="cnn")
    t.add_argument("--arch-kwargs", default=None, help='JSON, e.g. \'{"width": 2}\'')
    t.add_argument("--defense", default="none", choices=DEFENSES)
    t.add_argument("--sigma", type=float, default=0.0)
    t.add_argument("--eps", type=parse_eps, default=0.0, help="L-inf radius for crown-ibp, e.g. 2/255")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=0.2)
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="step",
                   help="adam: x0.1 at 50%% and 75%% of the steps after the eps ramp (step), or never (constant)")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--kappa-end", type=float, default=0.0, help="final natural-loss weight (crown-ibp)")
    t.add_argument("--train-eps-factor", type=float, default=1.0, help="train at eps times this (crown-ibp)")
    t.add_argument("--warmup-reg", type=float, default=0.0,
                   help="weight of Shi et al.'s warm-up regulariser (tightness + ReLU balance), fading to 0 over the "
                        "eps ramp; 0 turns it off, Shi et al. use 0.5 (crown-ibp)")
    t.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of steps at eps 0 (crown-ibp)")
    t.add_argument("--ramp-frac", type=float, default=0.5, help="fraction of steps of the eps ramp (crown-ibp)")
    t.add_argument("--beta-frac", type=float, default=1.0,
                   help="beta moves from --beta-start to --beta-end over this fraction of the eps ramp (crown-ibp)")
    t.add_argument("--beta-start", type=float, default=1.0,
                   help="CROWN-IBP weight beta at the start of the ramp; 0 trains with IBP alone (crown-ibp)")
    t.add_argument("--beta-end", type=float, default=0.0,
                   help="beta after --beta-frac of the ramp; Zhang et al.'s 1 -> 1 keeps CROWN-IBP on (crown-ibp)")
    t.add_argument("--no-augment", action="store_true", help="no random crop and flip of training images")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="checkpoint to initialise from")
    t.add_argument("--init-scheme", choices=INIT_SCHEMES, default="default",
                   help="fresh weights: PyTorch's default or the IBP initialisation of Shi et al. 2021")
    t.add_argument("--name", default=None, help="checkpoint name (default from arch/defense)")
    t.add_argument("--out-dir", default=None, help="folder for the checkpoint (default data/models)")
    t.add_argument("--force", action="store_true", help="replace an existing checkpoint of that name")
    t.add_argument("--n-train", type=int, default=None)
    t.add_argument("--n-test", type=int, default=None)
    t.add_argument("--n-verify", type=int, default=1000, help="test images for verified error (crown-ibp)")
    t.add_argument("--max-steps", type=int, default=None)
    add_data_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="model-zoo table: clean and noisy accuracy of every committed model")
    e.add_argument("--n-images", type=int, default=None, help="test images (default: all available)")
    e.add_argument("--out", default=None)
    e.add_argument("--certify-images", type=int, default=20, help="images certified per smoothing model")
    e.add_argument("--certify-n", type=int, default=1000, help="CERTIFY noise samples n (paper: 100000)")
    e.add_argument("--verify-images", type=int, default=1000, help="images for the CROWN-IBP error table")
    add_data_args(e)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("certify", help="certify test images and write per-image CSV, summary JSON and Markdown")
    certify_sub = c.add_subparsers(dest="certify_cmd", required=True)
    cs = certify_sub.add_parser("smoothing", help="randomized smoothing CERTIFY (Cohen et al. 2019)")
    cs.add_argument("--model", required=True, help="checkpoint name or path (sigma from its metadata)")
    cs.add_argument("--sigma", type=float, default=None, help="override the checkpoint's noise level")
    cs.add_argument("--n", type=int, default=10_000, help="noise samples for the pA bound (paper: 100000)")
    cs.add_argument("--n0", type=int, default=100, help="noise samples to pick the class")
    cs.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    cs.add_argument("--n-images", type=int, default=100, help="test images to certify (after --skip)")
    cs.add_argument("--skip", type=int, default=1,
                    help="certify every K-th test image (paper: 20, on the official order only)")
    cs.add_argument("--chunk", type=int, default=4, help="images per CERTIFY call (results do not depend on it)")
    cs.add_argument("--batch-size", type=int, default=1000, help="noisy images per forward pass")
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--out-dir", default=None, help="output folder (default outputs/certify/<model>)")
    add_resume_args(cs)
    add_data_args(cs)
    cs.set_defaults(func=cmd_certify_smoothing)
    cc = certify_sub.add_parser("crown-ibp", help="verified error of a CROWN-IBP model (IBP / CROWN-IBP / CROWN)")
    cc.add_argument("--model", required=True, help="checkpoint name or path (eps from its metadata)")
    cc.add_argument("--eps", type=parse_eps, default=None, help="override the checkpoint's eps, e.g. 2/255")
    cc.add_argument("--n-images", type=int, default=1000, help="first images of the split to verify")
    cc.add_argument("--split", default="test", choices=["test", "train"],
                    help="test images, or training images to measure the generalisation gap")
    cc.add_argument("--methods", nargs="+", default=["ibp", "crown-ibp"],
                    choices=["ibp", "crown-ibp", "crown", "alpha-crown"],
                    help="bounds to try (crown = full CROWN: minutes per image on the larger models with the "
                         "shadowlab backend; alpha-crown = auto_LiRPA's CROWN-Optimized, needs `make lirpa`)")
    cc.add_argument("--backend", default="shadowlab", choices=["shadowlab", "auto_lirpa"],
                    help="who computes ibp / crown-ibp / crown: shadowlab's bounds.py or auto_LiRPA (`make lirpa`)")
    cc.add_argument("--pgd-steps", type=int, default=20, help="PGD steps for the attack error (0: skip)")
    cc.add_argument("--batch-size", type=int, default=256, help="images per bound computation")
    cc.add_argument("--out-dir", default=None, help="output folder (default outputs/certify/<model>)")
    cc.add_argument("--chunk", type=int, default=256, help="images per verification call (one record write each)")
    add_resume_args(cc)
    add_data_args(cc)
    cc.set_defaults(func=cmd_certify_crown_ibp)

    r = sub.add_parser("reproduce", help="the paper's Table 1 (smoothing) and Table 2 (CROWN-IBP) at CPU size")
    r.add_argument("table", choices=["table1", "table2", "all"])
    t1, t2, p1 = Table1Settings(), Table2Settings(), Table1Settings.paper()
    r.add_argument("--n-images", type=int, default=None,
                   help=f"test images (default {t1.n_images} for table1, {t2.n_images} for table2; "
                        f"paper {p1.n_images})")
    r.add_argument("--n", type=int, default=None, help=f"CERTIFY samples (default {t1.n}; paper {p1.n})")
    r.add_argument("--n0", type=int, default=None, help=f"CERTIFY selection samples (default {t1.n0})")
    r.add_argument("--alpha", type=float, default=None, help=f"CERTIFY failure probability (default {t1.alpha})")
    r.add_argument("--steps", type=int, default=None, help=f"attack steps (default {t1.steps}; paper {p1.steps})")
    r.add_argument("--noise-samples", type=int, default=None,
                   help=f"noise copies per step (default {t1.noise_samples}; paper {p1.noise_samples})")
    r.add_argument("--channels", default=None, choices=["1", "3", "both"], help="table1 attack modes (default both)")
    r.add_argument("--sigmas", type=float, nargs="+", default=None,
                   help=f"table1 noise levels (default {' '.join(map(str, t1.sigmas))})")
    r.add_argument("--early-stop-margin", type=float, default=None,
                   help="stop a candidate once reached: table1, this fraction of its training noise predicts the "
                        f"target (default {t1.early_stop_margin}); table2, its certified margin is at least this "
                        f"(default {t2.early_stop_margin})")
    r.add_argument("--early-stop-scope", default=None, choices=["image", "candidate"],
                   help="table1: stop each (image, target) on its own, or all targets of an image once one is "
                        f"reached (default {t1.early_stop_scope})")
    r.add_argument("--no-early-stop", action="store_true", help="run every step (both tables)")
    r.add_argument("--keep-targets", type=int, default=None,
                   help="table1: after the prune step (5; --pruned: 2) keep only this many most promising targets "
                        "per image "
                        f"(default {t1.keep_targets}; 0: all)")
    r.add_argument("--min-ssim", type=float, default=None,
                   help=f"a shadow image counts as a success only with SSIM(shadow, natural) >= this, in (0, 1] "
                        f"(default {MIN_SSIM})")
    r.add_argument("--no-controls", action="store_true",
                   help="skip the controls (natural image, initialisation alone, smooth noise of the same L2 size)")
    r.add_argument("--models", nargs="+", default=None, help="table2: CROWN-IBP checkpoints (default: all crownibp-*)")
    r.add_argument("--model-template", default=None,
                   help=f"table1: checkpoint per sigma (default {t1.model_template!r}), e.g. "
                        "'cohen-resnet110-sigma{sigma:.2f}' for imported ones")
    r.add_argument("--seed", type=int, default=None, help=f"attack and CERTIFY seed (default {t1.seed})")
    r.add_argument("--faithful", action="store_true",
                   help="the authors' released procedure where shadowlab departs from it (docs/results.md): table2, "
                        "their normalised-space attack with IBP bounds judged on the last iterate (the batch: "
                        "--faithful-batch); table1, the last iterate and no clamp before the noise")
    r.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="table2: shadowlab's attack tuned on held-out images (default) or the paper's numbers "
                        "rescaled to shadowlab's per-candidate loss (ShadowConfig.tuned_crown_ibp / paper_crown_ibp)")
    r.add_argument("--faithful-batch", type=int, default=None,
                   help=f"table2 --faithful: the batch of images the authors' loss is averaged over (default "
                        f"{t2.faithful_batch}, theirs); each image gets its share of that batch whatever --chunk is")
    r.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="table1: the base network's arithmetic in the attack and CERTIFY (default fp32; bf16: "
                        "autocast, channels_last; a certificate is then one of the smoothed bf16 network). table2's "
                        "bounds stay float32")
    r.add_argument("--paper", action="store_true",
                   help="the authors' full settings (GPU: hours); every option given explicitly is kept")
    r.add_argument("--pruned", action="store_true",
                   help="with --paper, table1's search that fits a CPU (Table1Settings.paper_pruned): "
                        f"{PRUNED['keep_targets']} target kept after {PRUNED['prune_step']} steps, a candidate stops "
                        "once all its training noise is on the target or its objective has settled; CERTIFY, the "
                        "noise copies and the step limit stay the paper's")
    r.add_argument("--out-dir", default="outputs")
    r.add_argument("--chunk", type=int, default=None,
                   help="images per attack batch (default: from the device, 8 on a CPU, up to 512 on a GPU by its "
                        "free memory); records are written after each (a kill loses at most one chunk)")
    add_resume_args(r, records="OUT/table*/records/",
                    finished="OUT/table*/records/ holds finished records of this run's sigmas or models (they are "
                             "replaced; other groups' records are kept)")
    add_data_args(r)
    r.set_defaults(func=cmd_reproduce)
    co = sub.add_parser("cost", help="per-image cost of Table 1 / 2 at the paper's settings on this device, and "
                                     "the paper-scale wall time on K devices; under torchrun the ranks sharing a CPU "
                                     "are timed side by side, as a table run with them would be (e.g. "
                                     "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m shadowlab -- cost "
                                     "table1 --pruned --check)")
    co.add_argument("table", choices=["table1", "table2"])
    co.add_argument("--model", default=None, help="checkpoint (default smooth-sigma0.25 / the first crownibp-*)")
    co.add_argument("--arch", default=None, help="time this architecture with random weights instead, e.g. resnet110")
    co.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments of --arch")
    co.add_argument("--sigma", type=float, default=None, help="table1: noise level (default: the checkpoint's)")
    co.add_argument("--eps", type=parse_eps, default=None, help="table2: eps, e.g. 8/255 (default: the checkpoint's)")
    co.add_argument("--n-images", type=int, default=500, help="images per sigma or model of the paper-scale table")
    co.add_argument("--groups", type=int, default=None, help="sigmas or models (default 4 for either table)")
    co.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="device counts to predict")
    co.add_argument("--check", action="store_true", help="also time a larger point against the fit's prediction")
    co.add_argument("--chunk", type=int, default=None,
                    help="images timed together (default: the chunk the table would use on this device)")
    co.add_argument("--repeat", type=int, default=1, help="timings per point (the minimum is used)")
    co.add_argument("--keep-targets", type=int, default=None,
                    help="table1: the search keeps this many targets per image after the prune step, as "
                         "`reproduce table1 --keep-targets` (default: every target, the paper)")
    co.add_argument("--pruned", action="store_true",
                    help="table1: the search `reproduce table1 --paper --pruned` runs (Table1Settings.paper_pruned); "
                         "--check then times one paper image of it whole")
    co.add_argument("--out", default=None, help="also write the figures as JSON here")
    add_data_args(co)
    co.set_defaults(func=cmd_cost)
    rj = sub.add_parser("rejudge", help="re-judge a committed table from its files: SSIM again, a separate CERTIFY "
                                        "(or the bounds) of every shadow image's wrong label")
    rj.add_argument("table_dir", help="folder with table1.json or table2.json, the per-image CSV and the shadows npz")
    rj.add_argument("--n", type=int, default=None,
                    help="CERTIFY samples of the separate judgement (default: the table's)")
    rj.add_argument("--seed", type=int, default=987_654, help="certification seed (the tables never use it)")
    rj.add_argument("--figure", action="store_true", help="also draw SSIM against L2 with PGD and noise references")
    rj.add_argument("--device", default=None)
    rj.set_defaults(func=cmd_rejudge)

    bn = sub.add_parser("bench", help="benchmarks: Shadow Attack against ART, attack step and certification "
                                      "against bare throughput, bound timings")
    bn.add_argument("--model", default="smooth-sigma0.25", help="smoothing checkpoint")
    bn.add_argument("--n-images", type=int, default=20, help="test images for the comparison with ART")
    bn.add_argument("--steps", type=int, default=50)
    bn.add_argument("--lr", type=float, default=0.1)
    bn.add_argument("--noise-samples", type=int, default=64)
    bn.add_argument("--n0", type=int, default=100)
    bn.add_argument("--n-select", type=int, default=200, help="CERTIFY samples scoring each (image, target)")
    bn.add_argument("--n", type=int, default=1000, help="CERTIFY samples of the final certificates")
    bn.add_argument("--alpha", type=float, default=0.001)
    bn.add_argument("--certify-images", type=int, default=20)
    bn.add_argument("--certify-n", type=int, default=2000)
    bn.add_argument("--bound-images", type=int, default=100)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--run", type=parse_run, action="append", default=None, metavar="MARGIN,KEEP[,NOISE]",
                    help="a shadowlab run of the ART comparison (repeat for several): early-stop share of target votes "
                         "and targets kept per image after --prune-step steps, each 'none' for off; NOISE 'fresh' "
                         "(default) draws new noise copies every step, 'fixed' reuses one draw as ART does "
                         "(default runs: none,1 and none,1,fixed and 1.0,none)")
    bn.add_argument("--prune-step", type=int, default=5, help="steps on every target before keeping the best")
    bn.add_argument("--early-stop-scope", default="image", choices=["image", "candidate"],
                    help="stop a whole image once one target is reached, or each (image, target) on its own")
    bn.add_argument("--skip-art", action="store_true", help="leave out the comparison with ART")
    bn.add_argument("--min-ssim", type=float, default=MIN_SSIM,
                    help="a shadow image counts as a success only with SSIM(shadow, natural) >= this, in (0, 1]")
    bn.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                    help="the attack step's and CERTIFY's arithmetic and their limits' (shadowlab/precision.py)")
    bn.add_argument("--out", default="data/results", help="folder for bench.json and bench.md ('' to skip)")
    bn.add_argument("--readme", default=None, metavar="PATH",
                    help="also write the tables into this Markdown file's benchmark block (between the bench:start "
                         "and bench:end comments), e.g. docs/results.md; by default no Markdown file is changed "
                         "besides OUT/bench.md")
    add_data_args(bn)
    bn.set_defaults(func=cmd_bench)

    ic = sub.add_parser("import-checkpoint", help="convert the authors' released checkpoints into shadowlab ones")
    ic_sub = ic.add_subparsers(dest="import_cmd", required=True)
    icc = ic_sub.add_parser("cohen", help="Cohen et al.'s smoothing models (cifar_resnet110 / cifar_resnet20 / "
                                          "resnet50 checkpoint.pth.tar)")
    icc.add_argument("path", help="checkpoint.pth.tar of locuslab/smoothing (read with weights_only=True)")
    icc.add_argument("--sigma", type=float, required=True, help="the noise level it was trained with, e.g. 0.25")
    ick = ic_sub.add_parser("crown-ibp", help="CROWN-IBP's released CIFAR-10 models (<model_id>_best.pth)")
    ick.add_argument("path", help="a .pth of huanzhang12/CROWN-IBP (read with weights_only=True)")
    ick.add_argument("--arch", required=True, help="model class: model_cnn_2layer, model_cnn_3layer_fixed, "
                                                   "model_cnn_4layer or IBP_large (or the shadowlab name)")
    ick.add_argument("--arch-kwargs", default="{}",
                     help='its model_params as JSON, e.g. \'{"width": 1, "linear_size": 512}\'')
    ick.add_argument("--eps", type=parse_eps, required=True, help="training eps in pixels, e.g. 8/255")
    for sp in (icc, ick):
        sp.add_argument("--name", required=True, help="checkpoint name (then --model NAME everywhere)")
        sp.add_argument("--out-dir", default=None, help="folder for the checkpoint (default: the models folder, "
                                                        "$SHADOWLAB_MODELS or data/models)")
        sp.add_argument("--force", action="store_true", help="replace an existing checkpoint of that name")
        sp.set_defaults(func=cmd_import_checkpoint)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    b = dsub.add_parser("build-subset", help="rebuild data/cifar10_test_subset.npz from the JPEG copy")
    b.add_argument("--from", dest="source_path", required=True)
    d.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    allocator.keep_freed_memory()   # CPU runs stop faulting their activations in at every batch
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        check_common(args)
        return args.func(args)
    except (DataError, checkpoints.CheckpointError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def check_common(args: argparse.Namespace) -> None:
    """The options several commands share, checked before any work (ValueError naming the option): --device a
    device this machine has, --seed an integer >= 0, --resume and --overwrite not together."""
    if getattr(args, "device", None) is not None:
        validate.device(args.device, "--device")
    if getattr(args, "seed", None) is not None:
        validate.count(args.seed, "--seed", minimum=0)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise ValueError("--resume and --overwrite exclude each other: continue the records, or replace them")
