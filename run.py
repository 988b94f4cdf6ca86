"""minimcit: run one continual-instruction-tuning experiment.

    python run.py --method branchlora --tasks minicoin            # offline, CPU, minutes
    python run.py --method lilora --tasks cvit --data-root D --image-root I --model llava-1.5-7b-hf
    python run.py --method moelora --tasks coin --data-root D --image-root I \\
        --model vicuna-7b-v1.5 --vision-tower clip-vit-large-patch14-336 --projector mm_projector.bin

Writes <out>/results.json (accuracy and format matrices, continual metrics, parameter counts),
results.txt, acc_matrix.png, task_curves.png and adapter-only checkpoints after each stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import math
from dataclasses import asdict, fields
from pathlib import Path

import torch

from minimcit import distributed as dist
from minimcit.method import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, Range
from minimcit.methods import METHODS, check_hparams, make_method
from minimcit.check import check_benchmark
from minimcit.data import TEXTVQA_ANSWERS, Collator, load_benchmark, load_custom, missing_images, order_tasks
from minimcit.minicoin import PRESETS, minicoin, preset
from minimcit.checkpoint import load_model, read_config
from minimcit.model import Llava
from minimcit.plan import GiB, data_shapes, device_memory, make_plan
from minimcit.pretrain import pretrain_base
from minimcit.processing import LlavaPrompt, TextTokenizer
from minimcit.qwen2_vl import Qwen2VLConfig, Qwen2VLPrompt
from minimcit.report import write_report
from minimcit.runfolder import (first_difference, load_checkpoint, read_results, run_lock, seeded_start_task,
                                stages_done, write_evaluation)
from minimcit.train import Experiment, TrainConfig, evaluate, keep_freed_memory, new_results, rescore, run_continual

# Each paper's recipe for real data (MiniCoIN's sit in its preset table); a flag overrides each.
# CoIN (scripts/LLaVA/Train/*.sh), for its LoRA and MoELoRA and so for BranchLoRA, which builds on it:
# lr 2e-4, projector trained at 2e-5, 1 epoch, warm-up 0.03, cosine, no weight decay, 14 per device x 8
# GPUs x 8 accumulation steps = 896 per step, bf16 on GPU. LiLoRA (scripts/LiLoRA/Train/train_task.sh):
# lr 2e-5, weight decay 0.01, projector not trained (LiLoRA adapts it), 8 per device x 2 accumulation
# steps x 4 GPUs = 64 per step. Both group batches by modality and length and decode images in 4
# DataLoader workers. Here the global batch is batch_size x grad_accum, on any number of processes.
COIN_RECIPE = dict(epochs=1, batch_size=14, grad_accum=64, lr=2e-4, warmup_ratio=0.03, weight_decay=0.0,
                   train_projector=True, projector_lr=2e-5, eval_batch_size=16, max_new_tokens=32,
                   group_by_modality_length=True, num_workers=4)
LILORA_RECIPE = dict(epochs=1, batch_size=8, grad_accum=8, lr=2e-5, warmup_ratio=0.03, weight_decay=0.01,
                     train_projector=False, eval_batch_size=16, max_new_tokens=32, group_by_modality_length=True,
                     num_workers=4)
# SMoLoRA (scripts/SMoLoRA/Train_Eval/*.sh): lr 1e-4, weight decay 0.01, projector not trained (adapted), 8 per
# device x 2 accumulation steps x 4 GPUs = 64 per step, 1 epoch, warm-up 0.03, cosine. Its adapters on the projector
# train at 2e-5 there (--mm_projector_lr); here every adapter takes lr.
SMOLORA_RECIPE = dict(LILORA_RECIPE, lr=1e-4)
ADAPTER_DROPOUT = 0.05  # on the adapter input, as all three reference codebases train on real data


# A method names its own (Method.paper_recipe).
RECIPES = {"coin": COIN_RECIPE, "lilora": LILORA_RECIPE, "smolora": SMOLORA_RECIPE}


# The training flags, one per TrainConfig field (default: the benchmark's recipe), with the values
# a number may take: stated in --help and checked before anything loads.
TRAINING_FLAGS = {
    "epochs": (POSITIVE, "passes over a task's training data (a fraction allowed)"),
    "batch_size": (COUNT, "samples per micro-batch on one device"),
    "grad_accum": (COUNT, "micro-batches per optimiser step: the global batch is batch-size x grad-accum"),
    "lr": (POSITIVE, "AdamW's learning rate"),
    "warmup_ratio": (UNIT, "share of a stage's steps spent warming up (then cosine decay)"),
    "weight_decay": (NON_NEGATIVE, "AdamW's weight decay"),
    "max_grad_norm": (POSITIVE, "gradient-norm clip"),
    "eval_batch_size": (COUNT, "prompts per generation batch"),
    "max_new_tokens": (COUNT, "tokens generated per answer"),
    "gradient_checkpointing": (None, "recompute each decoder layer in the backward: memory for time"),
    "train_projector": (None, "train the projector's own weights too (CoIN's recipe)"),
    "group_by_modality_length": (None, "LLaVA's batching: one modality per step, sorted by length"),
    "num_workers": (NON_NEGATIVE, "DataLoader processes decoding images (the batches do not depend on it)"),
    "projector_lr": (POSITIVE, "the trained projector's learning rate (default: lr)"),
}
# What only data the user brings reads (--tasks coin, cvit, custom).
REAL_DATA_FLAGS = ("data_root", "image_root", "model", "vision_tower", "projector", "tokenizer", "textvqa_answers",
                   "max_per_task", "max_test_per_task", "device_memory")
# The other numeric flags' values (a method's own declare theirs on their Option).
RANGES = {"seed": Range(0, 2**32 - 1), "stage": NON_NEGATIVE, "device_memory": POSITIVE, "max_per_task": COUNT,
          "max_test_per_task": COUNT, "r": COUNT, "lora_alpha": POSITIVE, "dropout": FRACTION,
          **{name: rng for name, (rng, _) in TRAINING_FLAGS.items() if rng is not None}}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def in_range(text: str, rng) -> str:
    return f"{text} (in {rng})" if rng is not None else text


def out_path(text: str) -> Path:
    if not text.strip():  # Path("") is the working folder: an unset shell variable would write the run there
        raise argparse.ArgumentTypeError("--out is empty (an unset shell variable?): name the run's folder")
    return Path(text)


def preset_of(args) -> str:
    return args.preset or "default"


def paper_recipe(method: str) -> dict:
    return RECIPES[METHODS[method].paper_recipe]


def method_options(method: str) -> set[str]:
    """The flags (dest names) that belong to `method`: its class's options."""
    return {o.name for o in METHODS[method].options}


def all_method_options() -> dict:
    """Every method's own options by name (a flag several methods share appears once)."""
    return {o.name: o for cls in METHODS.values() for o in cls.options}


def add_method_flags(group) -> None:
    """Every method's own flags, from the options its class declares; a flag several methods
    share says which."""
    users = {}
    for name, cls in sorted(METHODS.items()):
        for o in cls.options:
            users.setdefault(o.name, (o, []))[1].append(name)
    for o, names in users.values():
        text = in_range(f"{', '.join(names)}: {o.help}", o.range)
        if o.type is None:
            action = argparse.BooleanOptionalAction if o.negatable else "store_true"
            group.add_argument(flag(o.name), action=action, default=None, help=text)
        else:
            group.add_argument(flag(o.name), type=o.type, choices=o.choices or None, help=text)


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                exit_on_error=exit_on_error)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--tasks", choices=["minicoin", "minicvit", "coin", "cvit", "custom"],
                   help="custom: your own tasks in CoIN's file format under --task-dir")
    p.add_argument("--task-order", help="a comma-separated subset or permutation of the benchmark's tasks")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="minicoin/minicvit: the benchmark's size (default: default); real data takes the paper's recipe")
    p.add_argument("--out", type=out_path, help="output folder (default runs/<method>-<tasks>-<preset or paper>)")
    p.add_argument("--seed", type=int, default=0, help=in_range("every random stream of the run (0)", RANGES["seed"]))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where there is one; under torchrun each process its own)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    free = ", ".join(name for name, m in METHODS.items() if m.paper_identity == "selector")
    p.add_argument("--task-identity", choices=["oracle", "selector"],
                   help="how task-specific methods pick their parameters at test time (default: oracle; "
                        f"{free} on coin/cvit: selector, its paper's identity-free protocol)")
    p.add_argument("--check-data", action="store_true",
                   help="coin, cvit or custom: check every file, item and image as the run would read them, then stop")
    p.add_argument("--rescore", type=Path, metavar="OUT", help="rebuild a run's matrices from its saved predictions")
    p.add_argument("--evaluate", type=Path, metavar="OUT",
                   help="evaluate a run's saved adapters again into OUT/evaluations/ (the run's own command is reused)")
    p.add_argument("--stage", type=int, help=in_range("with --evaluate: which stage's adapters (default: the last "
                                                       "finished; 0: the base model)", RANGES["stage"]))
    p.add_argument("--skip-base-eval", action="store_true", help="do not evaluate the base model (row 0 stays empty)")
    p.add_argument("--device-memory", type=float, metavar="GB",
                   help=in_range("real data: plan micro-batch, checkpointing and eval batch for this much device "
                                 "memory (GiB; default on a GPU: its free memory; on a CPU: no plan, the recipe as it "
                                 "is)", RANGES["device_memory"]))
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="the frozen base's dtype (default: bf16 on CUDA, fp32 on CPU); adapters stay fp32")
    p.add_argument("--quiet", action="store_true", help="no progress lines (errors and the results still print)")
    g = p.add_argument_group("real data (coin, cvit, custom)")
    g.add_argument("--data-root", type=Path)
    g.add_argument("--image-root", type=Path)
    g.add_argument("--model", type=Path, help="llava-hf folder, or the LLM folder of the original layout")
    g.add_argument("--vision-tower", type=Path, help="CLIP folder (original layout)")
    g.add_argument("--projector", type=Path, help="mm_projector.bin / .safetensors (original layout)")
    g.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one in --model)")
    g.add_argument("--max-per-task", type=int, help=in_range("cap on train and test samples per task", COUNT))
    g.add_argument("--max-test-per-task", type=int, help=in_range("cap on test samples per task alone", COUNT))
    g.add_argument("--task-dir", type=Path, help="--tasks custom: <Task>/train.json, test.json (and tasks.json)")
    g.add_argument("--instructions", default="original", choices=["original", "type2"],
                   help="CoIN's instruction set (Instructions_Original or Instructions_Type2)")
    g.add_argument("--textvqa-answers", type=Path,
                   help="TextVQA_0.5.1_val.json (default: <image-root>/TextVQA/TextVQA_0.5.1_val.json)")
    g.add_argument("--cache", type=Path, help="where the MiniCoIN base model is cached")
    add_method_and_training_flags(p)
    return p


def add_method_and_training_flags(p) -> None:
    h = p.add_argument_group("method (defaults: the papers'; MiniCoIN scales r to its tiny model)")
    # --lora-r too: under torchrun, --r is read by torchrun itself (a prefix of its --rdzv-* and --role).
    h.add_argument("--r", "--lora-r", dest="r", type=int, help=in_range("the adapters' rank r (128)", COUNT))
    h.add_argument("--lora-alpha", type=float, help=in_range("the LoRA scale's numerator: s = alpha / r (256)",
                                                             POSITIVE))
    h.add_argument("--dropout", type=float, help=in_range(f"adapter input dropout (coin/cvit {ADAPTER_DROPOUT}, "
                                                          "MiniCoIN 0)", FRACTION))
    h.add_argument("--target", help="the linears adapted: llm (q,k,v,o,gate,up,down of every layer), ffn+projector "
                                    "(gate,up,down and both projector linears), or a regex of full module names in the "
                                    "language model and projector (default: the method's paper's placement)")
    add_method_flags(h)
    t = p.add_argument_group("training (defaults: the benchmark's recipe)")
    for f in fields(TrainConfig):
        if f.name == "seed":
            continue
        rng, text = TRAINING_FLAGS[f.name]
        # Every flag defaults to None, meaning "the recipe's value"; any value given, 0 included, is used.
        if f.type in ("bool", bool):
            t.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            t.add_argument(flag(f.name), type=int if str(f.type) == "int" else float, help=in_range(text, rng))


def method_hparams(args) -> dict:
    hp = dict(preset(preset_of(args)).adapter) if args.tasks.startswith("mini") else {"dropout": ADAPTER_DROPOUT}
    for name in ("r", "lora_alpha", "dropout", "target", *sorted(all_method_options())):
        if getattr(args, name) is not None:
            hp[name] = getattr(args, name)
    if args.task_identity == "selector" and "use_selector" in method_options(args.method):
        hp["use_selector"] = True  # identity-free inference needs the selector trained
    wrong = sorted(set(hp) - {"r", "lora_alpha", "dropout", "target"} - method_options(args.method))
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply to --method {args.method}")
    return hp


def training_flags(args) -> dict:
    """The TrainConfig fields the user set by flag (0 included), with their values."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)
            if f.name != "seed" and getattr(args, f.name) is not None}


def train_config(args) -> TrainConfig:
    """The benchmark's recipe, with every flag the user gave (0 included) in its place."""
    recipe = preset(preset_of(args)).recipe if args.tasks.startswith("mini") else paper_recipe(args.method)
    return TrainConfig(seed=args.seed, **{**recipe, **training_flags(args)})


def task_identity(args) -> str:
    if args.task_identity:
        return args.task_identity
    return "oracle" if args.tasks.startswith("mini") else METHODS[args.method].paper_identity


def validate(args) -> None:
    """Refuse out-of-range flags before anything loads."""
    ranges = {**RANGES, **{name: o.range for name, o in all_method_options().items() if o.range is not None}}
    for name, rng in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value in rng):
            raise ValueError(f"{flag(name)} must be in {rng}, got {value:g}")
    if args.task_order is not None and not [t for t in args.task_order.split(",") if t.strip()]:
        raise ValueError("--task-order is empty: name the tasks to run, comma-separated (or drop the flag for all)")
    if args.preset is not None and not args.tasks.startswith("mini"):
        raise ValueError(f"--preset sizes MiniCoIN and MiniCVIT; --tasks {args.tasks} runs the paper's recipe "
                         "(set its flags one by one instead)")
    if args.tasks.startswith("mini"):  # built in: a flag about data the user brings would be ignored
        given = [name for name in REAL_DATA_FLAGS if getattr(args, name) is not None]
        if args.instructions != "original":
            given.append("instructions")
        if given:
            raise ValueError(f"{', '.join(flag(n) for n in given)} applies to real data; --tasks {args.tasks} is "
                             "built in and sizes itself by --preset")
    elif args.cache is not None:
        raise ValueError(f"--cache holds MiniCoIN's base model; --tasks {args.tasks} loads --model")
    if (args.tasks == "custom") != (args.task_dir is not None):
        raise ValueError("--tasks custom and --task-dir go together")
    # r divisible by N, top-k within N, ...: before loading, on a tiny twin of the backbone the folder holds
    check_hparams(args.method, backbone_type(args), **method_hparams(args))
    cfg = train_config(args)
    if args.projector_lr is not None and not cfg.train_projector:
        raise ValueError("--projector-lr sets the trained projector's rate, but this recipe does not train the "
                         "projector: add --train-projector, or drop --projector-lr")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device torch knows (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch build sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if getattr(args, "use_selector", None) and task_identity(args) != "selector":
        raise ValueError("--use-selector trains a task selector that oracle identity never asks: add "
                         "--task-identity selector, or drop --use-selector")
    for name in ("task_dir", "data_root"):  # a run folder there would become part of the data it reads
        root = getattr(args, name)
        if root is not None and args.out is not None and Path(args.out).resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(f"--out {args.out} is inside {flag(name)} {root}: write the run elsewhere")
    if args.task_identity == "selector" and not METHODS[args.method].task_specific:
        raise ValueError(f"--task-identity selector: {args.method} has no per-task parameters to choose between "
                         "(one set serves every task); the selector applies to "
                         + ", ".join(n for n, m in METHODS.items() if m.task_specific))


def missing_flags(args, names) -> list[str]:
    """The flags among `names` (argparse attribute names) that were not given, as typed."""
    return [f"--{a.replace('_', '-')}" for a in names if getattr(args, a) is None]


def out_folder(args) -> Path:
    mini = args.tasks.startswith("mini")
    return args.out or Path("runs") / f"{args.method}-{args.tasks}-{preset_of(args) if mini else 'paper'}"


# What --evaluate and --rescore take beside their folder: they rebuild the run from its own
# command, so any other flag would be silently ignored. --evaluate may run elsewhere (device,
# dtype, batch and workers: how it executes, not what it computes).
EVALUATE_FLAGS = {"evaluate", "stage", "device", "dtype", "eval_batch_size", "num_workers", "quiet"}
RESCORE_FLAGS = {"rescore", "quiet"}
CHECK_FLAGS = {"check_data", "tasks", "data_root", "image_root", "instructions", "textvqa_answers", "task_dir", "method",
               "quiet"}  # --method too: "check before my run" is how it is typed


def given_flags(args) -> set[str]:
    """The flags (dest names) set to something other than their default."""
    defaults = vars(parse_args([]))
    return {k for k, v in vars(args).items() if v != defaults.get(k)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        for mode, allowed, what in (("rescore", RESCORE_FLAGS, "rebuilds the run from its own command"),
                                    ("evaluate", EVALUATE_FLAGS, "rebuilds the run from its own command"),
                                    ("check_data", CHECK_FLAGS, "checks the data and stops")):
            if getattr(args, mode):
                extra = sorted(given_flags(args) - allowed)
                if extra:
                    raise ValueError(f"{flag(mode)} {what} and takes "
                                     f"{', '.join(flag(a) for a in sorted(allowed - {mode}))} only; drop "
                                     f"{', '.join(flag(a) for a in extra)}")
        if args.rescore:
            return rescore_run(args.rescore)
        if args.evaluate:
            return evaluate_run(args.evaluate, args, argv)
        if args.stage is not None:
            raise ValueError("--stage picks the adapters --evaluate OUT evaluates; a run trains every stage")
        missing = missing_flags(args, ("method", "tasks"))
        if args.check_data:
            return check_data(args)
        if missing:
            raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
        validate(args)
        return run(args, argv)
    except KeyboardInterrupt:
        if dist.is_main():  # under torchrun every process is interrupted; one says so
            print(f"\ninterrupted: {interrupted(args)}", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, FloatingPointError) as e:  # OSError: also a full disk mid-run
        print(f"error: {own_words(e)}", file=sys.stderr)
        return 1


def own_words(e: Exception) -> str:
    """An error's own message: a KeyError's without quotes, and a DataLoader worker's (an image that
    does not decode) without the worker's traceback it arrives wrapped in."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def interrupted(args) -> str:
    """What an interrupt left behind."""
    if args.evaluate or args.rescore or args.check_data or not (args.method and args.tasks):
        return "nothing of the run was changed"
    results = out_folder(args) / "results.json"
    if results.is_file():
        return f"{results} holds every stage finished so far; continue with the same command and --resume"
    return f"no stage had finished, so {results} was not written yet; run the same command again"


def probe_writable(out: Path) -> None:
    """Fail now, not after minutes of loading, where --out cannot be written; leave no folder behind."""
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        if made:
            out.rmdir()  # the run makes it when it writes; a refusal before then leaves nothing
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out}: {e.strerror or e}") from None


def rescore_run(out: Path) -> int:
    results = rescore(out)
    print(write_report(results, out))
    print(f"rescored {out / 'results.json'} from {out / 'predictions'}")
    return 0


def check_data(args) -> int:
    if args.tasks not in ("coin", "cvit", "custom"):
        raise ValueError("--check-data checks data you bring: use it with --tasks coin, cvit or custom")
    missing = missing_flags(args, ("task_dir", "image_root") if args.tasks == "custom" else ("data_root", "image_root"))
    if missing:
        raise ValueError(f"--check-data needs {', '.join(missing)}")
    table, faults, notes = check_benchmark(args.tasks, args.data_root, args.image_root, args.instructions,
                                           args.textvqa_answers, task_dir=args.task_dir)
    print(table)
    for line in notes:
        print(f"note: {line}")
    for line in faults[:50]:
        print(f"fault: {line}")
    if len(faults) > 50:
        print(f"... and {len(faults) - 50} more faults")
    print(f"{len(faults)} fault(s) found" if faults else "no faults found")
    return 1 if faults else 0


def run(args, argv: list) -> int:
    out = out_folder(args)
    _, world = dist.init(args.device)  # torchrun: one process per device, the same flags everywhere
    if not dist.is_main():
        args.quiet = True  # rank 0 reports
    if dist.is_main():
        probe_writable(out)  # before minutes of loading
    dist.barrier()
    exp = build(args, argv)
    if not args.quiet:
        print(f"global batch: {exp.cfg.batch_size} x {exp.cfg.grad_accum} accumulation = "
              f"{exp.cfg.batch_size * exp.cfg.grad_accum} samples per step, dealt out over {world} process(es); "
              "the same optimisation at any world size", file=sys.stderr)
    try:
        results = run_continual(exp, out, resume=args.resume)
    finally:
        dist.finish()
    if dist.is_main():
        print(write_report(results, out))
        print(f"wrote {out / 'results.json'}, results.txt, acc_matrix.png, task_curves.png, loss_curves.png")
    return 0


def evaluate_run(out: Path, cli, argv: list) -> int:
    """Evaluate a finished or interrupted run's saved adapters again, rebuilt from the run's own
    command (data paths included); a new folder under out/evaluations/, the run untouched. Refused
    when the data or the model the run recorded have changed since."""
    results = read_results(out, "--evaluate")
    saved = results.get("argv")
    if not isinstance(saved, list):
        raise ValueError(f"{out / 'results.json'} has no 'argv' (written by an older minimcit): --evaluate rebuilds "
                         "the run from it")
    try:
        args, unknown = build_parser(exit_on_error=False).parse_known_args(saved)
    except argparse.ArgumentError as e:
        unknown = [str(e)]
    if unknown:
        raise ValueError(f"{out / 'results.json'}: its 'argv' is not a command this run.py takes ({' '.join(unknown)}); "
                         "--evaluate rebuilds the run from it")
    if args.method is None or args.tasks is None:
        raise ValueError(f"{out / 'results.json'}: its 'argv' names no --method or --tasks")
    for name in EVALUATE_FLAGS & given_flags(cli) - {"evaluate", "stage"}:  # how it runs here
        setattr(args, name, getattr(cli, name))
    recorded = results["config"]  # the paths as the run resolved them: --evaluate may run from another folder
    for option, path in (recorded.get("paths") or {}).items():
        if path is not None:
            setattr(args, option[2:].replace("-", "_"), Path(path))
    if args.model is not None and Path(recorded.get("model", "")).is_absolute():
        args.model = Path(recorded["model"])
    args.out, args.resume = out, False
    validate(args)  # the flags given here (--device, --eval-batch-size) as a run's are
    done = stages_done(results)
    stage = done if cli.stage is None else cli.stage
    if not 0 <= stage <= done:
        raise ValueError(f"--stage {stage}: {out} has stages 0..{done} finished")
    exp = build(args, saved)
    diff = first_difference({k: v for k, v in recorded.items() if k != "dtype"},
                            {k: v for k, v in new_results(exp)["config"].items() if k != "dtype"})
    if diff is not None:
        setting, old, new = diff
        raise ValueError(f"--evaluate: {setting} was {old!r} when {out} ran, now {new!r}; the saved adapters "
                         "would be scored against other data or another model")
    with run_lock(out):
        if stage > 0:
            load_checkpoint(out / "checkpoints" / f"after_stage_{stage}.pt", exp.method, exp.model, exp.cfg)
        else:  # the base model, as the run evaluated it: the first task's adapters started, still the identity
            seeded_start_task(exp.method, 0, exp.cfg)
        ev = evaluate(exp, trained=exp.method.num_tasks if stage else 0)
        folder = write_evaluation(out, stage, ev, exp.primary, argv)  # this command, flags and all
    print(f"stage {stage} ({exp.primary}): " + "  ".join(f"{t.name} {'n/a' if v is None else v}"
                                                        for t, v in zip(exp.tasks, ev.rows[exp.primary])))
    print(f"wrote {folder}")
    return 0


def build(args, argv: list | None = None) -> Experiment:
    """Everything a run needs from its flags, resolved once: recipe, tasks, model, method."""
    hp = method_hparams(args)  # refuse bad flags before minutes of loading or pre-training
    identity = task_identity(args)
    cfg = train_config(args)
    device = torch.device(args.device)
    if device.type == "cuda" and dist.world_size() > 1:  # torchrun: this process's own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cpu":
        keep_freed_memory()
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if args.tasks.startswith("mini"):
        model_path, model, tasks, collator, plan = minicoin_parts(args, cfg, device, dtype)
    else:
        model_path, model, tasks, collator, plan = real_data_parts(args, hp, cfg, identity, device, dtype)
    if plan is not None:
        cfg = dataclasses.replace(cfg, batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                                  gradient_checkpointing=plan.gradient_checkpointing,
                                  eval_batch_size=plan.eval_batch_size)
    model.requires_grad_(False)  # the base is frozen: the method's adapters (and a trained projector) train
    # Adapters built at injection draw from the seed here, whatever ran before (stage 1 on a cache miss).
    torch.manual_seed(args.seed)
    method = make_method(args.method, model, **hp)
    run_info = {"model": str(Path(model_path).resolve()), "hparams": hp, "task_identity": identity,
                "max_per_task": args.max_per_task, "max_test_per_task": args.max_test_per_task,
                "dtype": dtype_name, **data_description(args, tasks, collator)}
    primary = "robust" if args.tasks.startswith("mini") or args.tasks == "custom" else "official"
    return Experiment(model, method, tasks, collator, cfg, identity, primary, device, run_info,
                      None if plan is None else plan.to_dict(), argv, args.skip_base_eval, args.quiet)


def check_generation_length(cfg: TrainConfig, c) -> None:
    """Before the memory plan traces generate and before a checkpoint loads: an answer must fit the
    model's positions."""
    positions = c.text.max_position_embeddings
    if cfg.max_new_tokens >= positions:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens}: the model has {positions} positions in all, "
                         "prompt included")


def minicoin_parts(args, cfg: TrainConfig, device, dtype):
    """A built-in benchmark: its base's folder (stage 1, trained once and cached), the base, tasks,
    collator, and no memory plan."""
    if dist.is_main():  # stage 1 once; the other processes read the cached base
        pretrain_base(preset_of(args), args.seed, args.cache, device=device, quiet=args.quiet)
    dist.barrier()
    model_path = pretrain_base(preset_of(args), args.seed, args.cache, device=device, quiet=True)
    tasks = order_tasks(minicoin(args.tasks, preset_of(args), args.seed), args.task_order)
    try:
        model = Llava.from_pretrained(model_path, dtype=dtype, device=device)
    except (OSError, ValueError) as e:  # a cache entry damaged after it was written
        raise ValueError(f"the cached MiniCoIN base in {model_path} cannot be loaded ({e}); delete that folder "
                         "and run again: stage 1 rebuilds it") from None
    check_generation_length(cfg, model.config)
    # MiniCoIN drops vicuna_v1's system line (SPEC §1 keeps it for real data): its base never saw
    # the line, and its 31 tokens were 43% of a sample's and 40% of the run's time (benchmarks/README.md).
    return model_path, model, tasks, make_collator(model_path, model.config, ""), None


def real_data_parts(args, hp: dict, cfg: TrainConfig, identity: str, device, dtype):
    """CoIN, CVIT or custom tasks from the user's paths, checked before the model loads: the
    checkpoint's folder, the model, tasks, collator and the memory plan for the device."""
    needed = ("image_root", "model") if args.tasks == "custom" else ("data_root", "image_root", "model")
    missing = missing_flags(args, needed)
    if missing:
        raise ValueError(f"--tasks {args.tasks} needs {', '.join(missing)}")
    if args.tasks == "custom":
        tasks = load_custom(args.task_dir, args.image_root, args.max_per_task, max_test=args.max_test_per_task)
    else:
        tasks = load_benchmark(args.tasks, args.data_root, args.image_root, args.max_per_task,
                               instructions=args.instructions, textvqa_answers=args.textvqa_answers,
                               max_test=args.max_test_per_task)
    tasks = order_tasks(tasks, args.task_order)
    gone = missing_images(tasks)  # before minutes of loading and hours of training
    if gone:
        shown = "\n  ".join(map(str, gone[:10]))
        raise FileNotFoundError(f"{len(gone)} image(s) the run would read are missing or empty under {args.image_root}, "
                                f"e.g.\n  {shown}\n(run.py --check-data lists every fault)")
    print_data_plan(args, tasks, cfg, identity)
    c = read_config(args.model, vision_tower=args.vision_tower)
    check_generation_length(cfg, c)
    collator = make_collator(args.tokenizer or args.model, c, model_path=args.model)
    plan = memory_plan(args, c, hp, cfg, tasks, collator, device, dtype)
    model = load_model(args.model, vision_tower=args.vision_tower, projector=args.projector, dtype=dtype, device=device)
    return args.model, model, tasks, collator, plan


def data_description(args, tasks, collator) -> dict:
    """What defines the data beyond the flags, for results.json's config."""
    if args.tasks.startswith("mini"):  # its test-set sizes and prompt
        return {"test_items": [len(t.test) for t in tasks], "system_line": bool(collator.prompt.system)}
    paths = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in
             ("--data-root", "--image-root", "--tokenizer", "--vision-tower", "--projector", "--textvqa-answers",
              "--task-dir")}
    images = sorted({str(Path(s.image).resolve()) for t in tasks for s in (*t.train, *t.test) if s.image is not None})
    sizes = hashlib.sha1("".join(f"{p}\t{Path(p).stat().st_size}\n" for p in images).encode()).hexdigest()[:16]
    return {"instructions": args.instructions,  # the paths, and what is in them
            "paths": {k: None if v is None else str(Path(v).resolve()) for k, v in paths.items()},
            "contents": content_fingerprint(tasks, args.model, args.tokenizer or args.model, args.projector,
                                            args.textvqa_answers or args.image_root / TEXTVQA_ANSWERS),
            "images": f"{len(images)} files, sizes {sizes}",  # one stat each: a replaced image is seen, mostly
            "scorers": {t.name: t.scorer for t in tasks}}


def backbone_type(args) -> str:
    """config.json's model_type for --model ("llava" when there is none yet: its errors come later, by name)."""
    config = None if args.model is None or args.vision_tower is not None else Path(args.model) / "config.json"
    try:
        raw = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, json.JSONDecodeError):
        raw = {}
    return "qwen2_vl" if isinstance(raw, dict) and raw.get("model_type") == "qwen2_vl" else "llava"


def make_collator(tok_path, c, system: str | None = None, model_path=None) -> Collator:
    """The tokenizer and the backbone's prompt (system: its default when None; Qwen2-VL reads its image
    limits from model_path), the tokenizer checked against the model it is to feed."""
    kind = Qwen2VLPrompt if isinstance(c, Qwen2VLConfig) else LlavaPrompt
    tok = TextTokenizer(tok_path, eos=kind.EOS)
    if len(tok) > c.text.vocab_size:  # ids past the table: an IndexError here, a device-side assert on a GPU
        raise ValueError(f"{tok_path}: the tokenizer has {len(tok)} tokens but the model's embedding has "
                         f"{c.text.vocab_size} rows; use the tokenizer that belongs to the model")
    prompt = kind.for_model(c, model_path or tok_path, system)
    prompt.check_tokenizer(tok, tok_path, c)
    return Collator(tok, prompt)


def memory_plan(args, c, hp: dict, cfg: TrainConfig, tasks, collator, device, dtype):
    """The memory plan (plan.py) for this device, made on rank 0 and shared, or None on a CPU run
    without --device-memory (host memory is not what limits a CPU run)."""
    if device.type != "cuda" and args.device_memory is None:
        return None
    plan = None
    if dist.is_main():
        memory = int(args.device_memory * GiB) if args.device_memory is not None else device_memory(device)
        train_shape, eval_shape = data_shapes(tasks, collator, cfg.max_new_tokens)
        given = set(training_flags(args))
        quiet = args.quiet

        def say(line):
            if not quiet:
                print(line, file=sys.stderr, flush=True)

        try:
            plan = make_plan(c, args.method, hp, cfg, memory=memory, train=train_shape, evaluation=eval_shape,
                             tasks=len(tasks), given=given, dtype=dtype, progress=say)
        except MemoryError as e:
            plan = str(e)
    plan = dist.broadcast(plan)
    if isinstance(plan, str):  # every process stops with rank 0's reason
        raise ValueError(plan)
    if not args.quiet:
        print(plan.summary(), file=sys.stderr)
    return plan


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path.stat().st_size}:{h.hexdigest()[:16]}"


def content_fingerprint(tasks, model: Path, tokenizer: Path, projector: Path | None, textvqa: Path) -> dict:
    """Sizes and hashes of the data files and of the checkpoint's small files (config, index,
    tokenizer, projector), so a resume over a changed copy is refused; weight files by size. By
    absolute path, so the same run seen from another working folder (--evaluate) is the same."""
    files = {Path(t.test_file) for t in tasks} | {Path(t.test_file).parent / "train.json" for t in tasks}
    model, tokenizer = Path(model), Path(tokenizer)
    files |= {p for p in (model / "config.json", model / "model.safetensors.index.json",
                          tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer, projector,
                          Path(textvqa)) if p}
    out = {str(p.resolve()): _digest(p) for p in sorted(files) if p.is_file()}
    out.update({str(p.resolve()): str(p.stat().st_size) for p in sorted(model.glob("*.safetensors"))})
    return out


def print_data_plan(args, tasks, cfg: TrainConfig, identity: str) -> None:
    """What a researcher must know before hours of training: the files each task is scored on,
    whether the official TextVQA score can be computed, and the recipe."""
    print(f"{args.tasks} ({args.instructions} instructions), task identity at test time: {identity}", file=sys.stderr)
    for t in tasks:
        note = ""
        if t.name == "TextVQA" and not all(isinstance(s.answers, list) and len(s.answers) == 10 for s in t.test):
            note = "  (no ten answers per item: official TextVQA score unavailable; pass --textvqa-answers)"
        print(f"  {t.name:10s} train {len(t.train):7d}  test {len(t.test):6d} from {t.test_file}{note}",
              file=sys.stderr)
    print("  recipe: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
