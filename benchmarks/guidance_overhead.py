"""Cost of language guidance per training step: omega = 0 versus omega > 0, same model and data.

Both variants run the training loop's own ``TrainStep`` on one fixed class-balanced batch,
interleaved (the order alternates each round) after a warm-up, so drift in machine load hits
both equally. Prints the median step times, their ratio (target <= 1.03) and images/s.

    .venv/bin/python benchmarks/guidance_overhead.py            # params.yaml's model and batch
    .venv/bin/python benchmarks/guidance_overhead.py --steps 50 --guidance both
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from step_timing import interleaved_medians, print_step_table, setup, step_arguments, synthetic_batch

from stages.core.dml.losses import build_dml_loss
from stages.core.dml.objective import DMLObjective
from stages.core.language.targets import EmbeddingTarget
from stages.core.model.encoder import build_model
from stages.core.model.similarity import COSINE
from stages.core.training.fit import TrainStep
from stages.core.training.optim import build_optimizer


def parse() -> argparse.Namespace:
    ap = step_arguments(__doc__.splitlines()[0], steps=20, warmup=3)
    ap.add_argument("--omega", type=float, default=1.0, help="the guided variant's omega")
    ap.add_argument("--guidance", choices=["elg", "plg", "both"], default="elg", help="targets (random embeddings)")
    ap.add_argument("--classes", type=int, default=100, help="classes in the language table")
    ap.add_argument("--dim", type=int, default=512, help="language embedding size (CLIP ViT-B/32: 512)")
    return ap.parse_args()


def main() -> None:
    args = parse()
    params, device, gen = setup(args.params)
    tp, mp = params.train, params.model
    cuda = device.type == "cuda"

    model = build_model(mp).to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    dml = build_dml_loss(tp.loss, args.classes, mp.embed_dim, params.training.loss_kwargs()).to(device)
    x, y = synthetic_batch(params, gen)
    if cuda:
        x, y = x.pin_memory(), y.pin_memory()
    elg = torch.randn(args.classes, args.dim, generator=gen)
    plg = torch.randn(5, args.classes, args.dim, generator=gen)
    targets = {"elg": [EmbeddingTarget(elg)], "plg": [EmbeddingTarget(plg)]}
    targets["both"] = targets["elg"] + targets["plg"]
    lang_kwargs = params.language.matching_kwargs()
    # Two objectives over the same model and loss, one optimiser: only the language term differs.
    common = {"language_kwargs": lang_kwargs, "image_similarity": COSINE, "lr": tp.lr, "head_lr": tp.effective_head_lr}
    plain = DMLObjective(model, dml, [], omega=0.0, **common)
    guided_targets = [t.to(device) for t in targets[args.guidance]]
    guided = DMLObjective(model, dml, guided_targets, omega=args.omega, **common)
    if tp.compile:
        plain.compile_model()
        guided.compile_model()
    optimizer = build_optimizer(tp.optimizer, plain.param_groups(), tp.lr, tp.weight_decay)
    variants = {
        "omega=0": TrainStep(plain, optimizer, device, amp=cuda and tp.amp),
        f"omega={args.omega:g} ({args.guidance})": TrainStep(guided, optimizer, device, amp=cuda and tp.amp),
    }

    medians = interleaved_medians(
        {name: partial(step, (x, y)) for name, step in variants.items()}, args.steps, args.warmup, cuda
    )
    names = list(variants)
    title = (
        f"{mp.backbone} @ {mp.image_size}px, batch {tp.batch_size}, loss {tp.loss}, "
        f"{args.steps} interleaved steps after {args.warmup} warm-up"
    )
    print_step_table(medians, tp.batch_size, title, device)
    base = medians[names[0]]
    ratio = medians[names[1]] / base
    print(f"overhead ratio {ratio:.3f} (target <= 1.03): {'OK' if ratio <= 1.03 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
