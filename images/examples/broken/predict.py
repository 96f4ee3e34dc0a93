"""Forgets to ship its model weights: the smoke job stops it after one case."""

import json

with open("/input/cases.json") as handle:
    cases = json.load(handle)["cases"]
print(f"loading the model for {len(cases)} case(s)", flush=True)
with open("/opt/algorithm/weights.pt", "rb") as handle:  # never copied into the image
    weights = handle.read()
