"""Make tests/data/dvae_encoder_*.{json,safetensors,pkl} by running openai/DALL-E's own dall_e code (unchanged).

Usage (outside the repo, with a checkout of github.com/openai/DALL-E on PYTHONPATH and `attrs` installed):

    python tests/data/make_dvae_encoder_fixture.py tests/data

* ``dvae_encoder_keys.json``: key/shape manifest of the released encoder (``Encoder()`` defaults:
  n_hid 256, 2 blocks per group, 8192 codes), built on the meta device;
* ``dvae_encoder_tiny_parity.safetensors``: the smallest encoder the original's validators allow
  (n_hid 64, 1 block per group, 512 codes), every parameter overwritten in state-dict order by
  ``torch.randn(shape, generator=torch.Generator().manual_seed(SEED + index)) * scale`` (a rule the test
  repeats, so the 1.5M weights need not be stored), the original's logits on ``map_pixels``'d random
  images, and their argmax;
* ``dvae_encoder_block.pkl``: ``torch.save`` of one original ``EncoderBlock`` (8 -> 8 channels), the
  pickle structure of the released ``encoder.pkl`` in small, for the safe reader.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dall_e.encoder import Encoder, EncoderBlock
from dall_e.utils import map_pixels

SEED = 1234


def scale_of(name: str, shape) -> float:
    """Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2)."""
    if len(shape) == 4:
        return (shape[1] * shape[2] * shape[3]) ** -0.5
    return 0.1


def fill(state: dict) -> dict:
    out = {}
    for i, (k, v) in enumerate(state.items()):
        g = torch.Generator().manual_seed(SEED + i)
        out[k] = torch.randn(tuple(v.shape), generator=g) * scale_of(k, v.shape)
    return out


def main(out: str) -> None:
    out_dir = Path(out)
    with torch.device("meta"):
        big = Encoder(device=torch.device("meta"))
    keys = {k: list(v.shape) for k, v in big.state_dict().items()}
    (out_dir / "dvae_encoder_keys.json").write_text(json.dumps(keys, indent=0) + "\n")

    tiny = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512).eval()
    tiny.load_state_dict(fill(tiny.state_dict()))
    torch.manual_seed(0)
    images = map_pixels(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        logits = tiny(images)
    save_file({"in.images": images, "out.logits": logits.contiguous(), "out.codes": logits.argmax(1).reshape(2, -1)},
              str(out_dir / "dvae_encoder_tiny_parity.safetensors"),
              metadata={"config": json.dumps(dict(n_hid=64, n_blk_per_group=1, vocab_size=512)), "seed": str(SEED),
                        "source": "openai/DALL-E dall_e.encoder.Encoder, run unchanged"})

    torch.manual_seed(0)
    block = EncoderBlock(n_in=8, n_out=8, n_layers=1)
    torch.save(block, out_dir / "dvae_encoder_block.pkl")
    (out_dir / "dvae_encoder_block_state.json").write_text(
        json.dumps({k: v.flatten().tolist() for k, v in block.state_dict().items()}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
