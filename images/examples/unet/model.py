"""The network, shared by training (on the host) and inference (in the container)."""

import numpy as np
import torch
from monai.networks.nets import UNet

LABELS = 4  # background, liver, tumour, cyst
HU_WINDOW = (-200.0, 200.0)
DIVISOR = 4  # two stride-2 levels: spatial sizes must be multiples of 4


def build() -> UNet:
    return UNet(spatial_dims=3, in_channels=1, out_channels=LABELS, channels=(8, 16, 32),
                strides=(2, 2), num_res_units=1)


def normalise(ct: np.ndarray) -> np.ndarray:
    low, high = HU_WINDOW
    return ((np.clip(ct.astype(np.float32), low, high) - low) / (high - low) * 2 - 1)


def pad_to_divisor(volume: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    shape = volume.shape
    padding = [(0, (-n) % DIVISOR) for n in shape]
    return np.pad(volume, padding, mode="edge"), shape


@torch.no_grad()
def predict(model: UNet, ct: np.ndarray) -> np.ndarray:
    padded, shape = pad_to_divisor(normalise(ct))
    logits = model(torch.from_numpy(padded)[None, None])
    labels = logits.argmax(dim=1)[0].numpy().astype(np.uint8)
    return labels[: shape[0], : shape[1], : shape[2]]
