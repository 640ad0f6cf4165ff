"""Training-step time of the set head: linear head vs DivE K=1 vs DivE K=4, same backbone and batch.

Each variant runs the training loop's own ``TrainStep`` (its ``Objective``: the base loss over a
smooth-Chamfer distance for sets, ELG language matching, the diversity term for K > 1) on one fixed
batch, interleaved after a warm-up so that drift in machine load hits all equally. Prints median step
times, images/s and the ratio to the linear head.

    .venv/bin/python benchmarks/set_step_time.py                 # params.yaml's backbone, batch, image size
    .venv/bin/python benchmarks/set_step_time.py --steps 30 --language-similarity smooth_chamfer
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
from stages.core.model.similarity import SimilaritySpec
from stages.core.training.fit import TrainStep
from stages.core.training.optim import build_optimizer


def parse() -> argparse.Namespace:
    ap = step_arguments(__doc__.splitlines()[0], steps=15, warmup=2)
    ap.add_argument("--language-similarity", default="cosine", choices=["cosine", "smooth_chamfer"])
    return ap.parse_args()


def main() -> None:
    args = parse()
    params, device, gen = setup(args.params)
    tp, mp = params.train, params.model
    cuda = device.type == "cuda"
    per_batch = tp.batch_size // tp.samples_per_class
    x, y = synthetic_batch(params, gen)
    elg = [EmbeddingTarget(torch.randn(per_batch, 384, generator=gen)).to(device)]
    variants: dict[str, TrainStep] = {}
    for name, head, slots in (("linear", "linear", 1), ("dive K=1", "dive", 1), ("dive K=4", "dive", 4)):
        vp = mp.model_copy(update={"head": head, "slots": slots})
        model = build_model(vp).to(device).train()
        dml = build_dml_loss(
            tp.loss, per_batch, vp.embed_dim, params.training.loss_kwargs(), similarity=model.similarity, slots=slots
        )
        objective = DMLObjective(
            model,
            dml.to(device),
            elg,
            omega=params.omega,
            language_kwargs=params.language.matching_kwargs(),
            image_similarity=SimilaritySpec(args.language_similarity, alpha=vp.alpha, centered=True),
            diversity=tp.diversity,
            lr=tp.lr,
            head_lr=tp.effective_head_lr,
        )
        optimizer = build_optimizer(tp.optimizer, objective.param_groups(), tp.lr, tp.weight_decay)
        variants[name] = TrainStep(objective, optimizer, device, amp=cuda and tp.amp)

    medians = interleaved_medians(
        {name: partial(step, (x, y)) for name, step in variants.items()}, args.steps, args.warmup, cuda
    )
    title = (
        f"{mp.backbone} @ {mp.image_size}px, batch {tp.batch_size}, loss {tp.loss}, ELG (S_img "
        f"{args.language_similarity}), {args.steps} interleaved steps after {args.warmup} warm-up"
    )
    print_step_table(medians, tp.batch_size, title, device)


if __name__ == "__main__":
    main()
