import os

from report import write

write("env.json", {key: value for key, value in os.environ.items()
                   if "NVIDIA" in key or "CUDA" in key})
