"""MONAI UNet inference: /input/<case_id>/ct.nii.gz -> /output/<case_id>/mask.nii.gz."""

import json
import os
import time

import nibabel as nib
import numpy as np
import torch
from model import build, predict

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def main() -> None:
    started = time.monotonic()
    model = build()
    model.load_state_dict(torch.load("/opt/algorithm/weights.pt", map_location="cpu",
                                     weights_only=True))
    model.eval()
    print(f"model loaded in {time.monotonic() - started:.2f} s", flush=True)
    with open("/input/cases.json") as handle:
        cases = json.load(handle)["cases"]
    for case in cases:
        began = time.monotonic()
        image = nib.load(f"/input/{case['case_id']}/ct.nii.gz")
        labels = predict(model, np.asarray(image.dataobj))
        os.makedirs(f"/output/{case['case_id']}", exist_ok=True)
        nib.save(nib.Nifti1Image(labels, image.affine), f"/output/{case['case_id']}/mask.nii.gz")
        print(f"{case['case_id']}: {time.monotonic() - began:.2f} s", flush=True)


if __name__ == "__main__":
    main()
