"""Plant links and special files in /output, hoping the host follows them when collecting."""

import os

os.symlink("/etc/shadow", "/output/shadow-link")
os.symlink("/", "/output/root-link")
os.mkdir("/output/case1")
os.symlink("/etc/passwd", "/output/case1/mask.nii.gz")
os.mkfifo("/output/pipe")  # a naive reader would block on this forever
with open("/output/case1/ok.txt", "w") as handle:
    handle.write("a real output\n")
print("planted", flush=True)
