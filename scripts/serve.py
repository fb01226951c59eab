"""A web page that draws images from a trained run or a public Stable Diffusion file.

    python scripts/serve.py --run runs/ldm/latest                     # http://127.0.0.1:7860
    python scripts/serve.py --ckpt v1-5-pruned-emaonly.safetensors --config configs/sd/v1-inference.yaml \\
           --lora-dir loras/ --port 8000
    python scripts/serve.py --run runs/ldm/latest --check             # draw one toy request, then exit

The page takes a prompt (or a class), negative prompt, sampler, steps, guidance, seed, size, number of images,
a control image for ControlNet models and a LoRA from --lora-dir; it shows each request's place in the queue and
its sampler steps, and a gallery of PNGs that carry their parameters (and the txt2img.py command that redraws
them). Visitors take turns in a bounded queue; it listens on 127.0.0.1 unless --host says otherwise. See
docs/serve.md.
"""

import sys

from ldm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
