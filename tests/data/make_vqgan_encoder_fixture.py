"""Make tests/data/vqgan_encoder_tiny.safetensors by running taming-transformers' own code (unchanged).

Usage (outside the repo, with a checkout of github.com/CompVis/taming-transformers and einops installed):

    python tests/data/make_vqgan_encoder_fixture.py TAMING/taming tests/data

It builds taming's ``Encoder`` (``taming/modules/diffusionmodules/model.py``), a 1x1 ``quant_conv`` and
``VectorQuantizer2`` (``taming/modules/vqvae/quantize.py``) as ``VQModel`` wires them (encode: encoder ->
quant_conv -> quantize), with a tiny configuration (seed 0; parameters rounded to float16 so the file stays
small), runs them on random images and stores the weights (under taming's state-dict names), inputs,
the output of every down level from the third on, the pre-quantisation latent and the code indices.  It also writes the key/shape
manifest of the encoder side of the f16-16384 configuration (``configs`` of the released
``vqgan_imagenet_f16_16384``: ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16, z 256, 16384 x 256
codebook), built on the meta device.
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2, 1, 1, 1), num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
            in_channels=3, resolution=64, z_channels=16, double_z=False)
TINY_CODES = dict(n_embed=24, embed_dim=16)
F16 = dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
           in_channels=3, resolution=256, z_channels=256, double_z=False)
F16_CODES = dict(n_embed=16384, embed_dim=256)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(model_mod, quant_mod, dd, codes):
    enc = model_mod.Encoder(**dd)
    quant_conv = torch.nn.Conv2d(dd["z_channels"], codes["embed_dim"], 1)
    quantize = quant_mod.VectorQuantizer2(codes["n_embed"], codes["embed_dim"], beta=0.25)
    root = torch.nn.Module()
    root.encoder, root.quant_conv, root.quantize = enc, quant_conv, quantize
    return root


def main(taming: str, out: str) -> None:
    model_mod = load(Path(taming) / "modules/diffusionmodules/model.py", "taming_model")
    quant_mod = load(Path(taming) / "modules/vqvae/quantize.py", "taming_quantize")
    out_dir = Path(out)
    with torch.device("meta"):
        big = build(model_mod, quant_mod, F16, F16_CODES)
    keys = {k: list(v.shape) for k, v in big.state_dict().items()}
    (out_dir / "vqgan_f16_16384_encoder_keys.json").write_text(json.dumps(keys, indent=0) + "\n")

    torch.manual_seed(0)
    root = build(model_mod, quant_mod, TINY, TINY_CODES).eval()
    with torch.no_grad():
        for name, p in root.named_parameters():
            scale = 1.0 if name.startswith("quantize") else (0.2 if p.dim() > 1 else 0.05)
            base = 1.0 if (p.dim() == 1 and "norm" in name and name.endswith("weight")) else 0.0
            p.copy_((torch.randn_like(p) * scale + base).half().float())
    images = torch.rand(2, 3, 64, 64) * 2 - 1  # taming's pixel range
    levels = {}
    with torch.no_grad():
        enc = root.encoder
        h = enc.conv_in(images)
        for i in range(len(TINY["ch_mult"])):
            for j in range(TINY["num_res_blocks"]):
                h = enc.down[i].block[j](h, None)
                if len(enc.down[i].attn) > 0:
                    h = enc.down[i].attn[j](h)
            if i >= 2:  # the two largest maps would make the file too big
                levels[f"level.{i}"] = h.clone()
            if i != len(TINY["ch_mult"]) - 1:
                h = enc.down[i].downsample(h)
        z = enc(images)  # the whole encoder, as VQModel.encode calls it
        pre = root.quant_conv(z)
        z_q, _, (_, _, indices) = root.quantize(pre)
    tensors = {f"weight.{k}": v.half().contiguous() for k, v in root.state_dict().items()}
    tensors.update({f"act.{k}": v.contiguous() for k, v in levels.items()})
    tensors.update({"in.images": images, "out.z": z, "out.pre_quant": pre, "out.z_q": z_q,
                    "out.indices": indices.reshape(2, -1).contiguous()})
    meta = {"ddconfig": json.dumps(TINY), "codes": json.dumps(TINY_CODES),
            "source": "CompVis/taming-transformers Encoder + VectorQuantizer2, run unchanged"}
    save_file(tensors, str(out_dir / "vqgan_encoder_tiny.safetensors"), metadata=meta)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
