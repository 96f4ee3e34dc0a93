"""Train the example UNet on synthetic phantoms; writes weights.pt beside this file.

    .venv/bin/python images/examples/unet/train.py [--steps 400] [--seed 0]

CPU only, a few minutes on 2 cores. The cases are synthesised with seeds the
demo's test sets never use, so the demo scores the network on unseen phantoms.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2]))

from model import build, normalise, pad_to_divisor  # noqa: E402

from engine.synthetic import synth_case  # noqa: E402

TRAINING_SEED_OFFSET = 1000  # the demo's datasets use small seeds


def training_pairs(count: int, size: int, seed: int):
    for index in range(count):
        case = synth_case(f"train-{index}", np.random.default_rng([TRAINING_SEED_OFFSET + seed,
                                                                    index]), size)
        image, _ = pad_to_divisor(normalise(case.image.array))
        labels, _ = pad_to_divisor(case.labels.array.astype(np.int64))
        yield torch.from_numpy(image)[None], torch.from_numpy(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    from monai.losses import DiceCELoss

    pairs = list(training_pairs(args.cases, args.size, args.seed))
    model = build()
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in rng.integers(0, len(pairs), size=2)]
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])[:, None]
        optimiser.zero_grad()
        loss = loss_function(model(images), labels)
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)",
                  flush=True)
    torch.save(model.state_dict(), HERE / "weights.pt")
    print(f"wrote {HERE / 'weights.pt'}")


if __name__ == "__main__":
    main()
