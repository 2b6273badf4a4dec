"""Same-machine PyTorch timing of the two backbones of DeRIS-B, for `deris bench`'s stage table.

The authors' full model needs mmcv/mmdet; its two backbones are plain architectures that
torchvision has with the same shapes and FLOPs: Swin-S (C0 96, depths 2-2-18-2, window 7) on a
384x384 image, and BEiT-3 base, whose 12 layers cost what ViT-B/16's encoder layers cost on the
same token count (196 patches + CLS + 20 text tokens = 217; BEiT-3's two FFN experts split the
tokens, the sum of work is the same). Random weights, eval mode, no_grad, f32, 2 threads, like
fixtures/reference-timing.md.

    python scripts/pytorch-backbones.py [runs]      # needs torch and torchvision (PyPI)
"""
import statistics
import sys
import time

import torch
import torchvision

torch.set_num_threads(2)
torch.set_num_interop_threads(2)
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7


def timed(name, fn):
    with torch.no_grad():
        fn()
        fn()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    print(f"{name}: median {statistics.median(ts):.3f} s, min {min(ts):.3f} s over {runs} runs")
    return statistics.median(ts)


swin = torchvision.models.swin_s().eval().features
img = torch.randn(1, 3, 384, 384)
vit = torchvision.models.vit_b_16().eval().encoder.layers
tokens = torch.randn(1, 217, 768)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}")
s = timed("swin-s 384 (features)", lambda: swin(img))
b = timed("beit3-base-equivalent (12 ViT-B layers, 217 tokens)", lambda: vit(tokens))
print(f"sum {s + b:.3f} s")
