"""Search a diffusers pipeline loaded from a local directory, with a classifier verifier and a held-out one.

    python examples/image_search_local_pipeline.py [--dir mnist-ddpm] [--strategy evosearch] [--budget 320]

The first run trains the image-search task's small MNIST models (cached under
$MMTTS_CACHE) and saves the diffusion model as a DDPMPipeline directory; any
other local pipeline directory (DDPMPipeline, DiTPipeline, Stable-Diffusion-like)
is searched the same way.
"""

import argparse
from pathlib import Path

from diffusers import DDIMScheduler, DDPMPipeline

import mmtts
from mmtts.modalities.image import ImageProcess
from mmtts.tasks.image_search import NULL_CLASS, make_scheduler, to_unit
from mmtts.verifiers import ClassifierLogProb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="mnist-ddpm")
    ap.add_argument("--strategy", default="evosearch", choices=mmtts.list_strategies())
    ap.add_argument("--budget", type=int, default=320)
    ap.add_argument("--digit", type=int, default=3)
    args = ap.parse_args()

    task = mmtts.create_task("image-search")
    models = task.models()                                   # trains and caches on first use
    if not (Path(args.dir) / "model_index.json").exists():
        DDPMPipeline(unet=models["unet"], scheduler=make_scheduler()).save_pretrained(args.dir)

    pipe = DDPMPipeline.from_pretrained(args.dir)            # the real loading code, on a local directory
    process = ImageProcess.from_pipeline(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                         num_inference_steps=20, eta=0.0, class_label=NULL_CLASS)
    guide = ClassifierLogProb(models["A"], target=args.digit, transform=to_unit, name="classifier-A")
    held = ClassifierLogProb(models["B"], target=args.digit, transform=to_unit, name="classifier-B")
    result = mmtts.search(process, guide, args.strategy, budget=args.budget, seed=0, heldout=[held])
    print(f"{args.strategy}: log p_A(digit {args.digit}) = {result.best_score:.3f}, "
          f"held-out log p_B = {float(result.heldout['classifier-B'][0]):.3f}, NFE {result.budget['nfe']}")


if __name__ == "__main__":
    main()
