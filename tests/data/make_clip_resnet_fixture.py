"""Make tests/data/clip_resnet_tiny.* by running openai/CLIP's own clip/model.py (unchanged).

Usage (outside the repo, with a checkout of github.com/openai/CLIP):

    python tests/data/make_clip_resnet_fixture.py /path/to/CLIP/clip/model.py tests/data

It builds the original ``CLIP`` class with a tiny ResNet configuration, randomises every
parameter and BatchNorm statistic (seed 0), converts it to the released mixed fp16/fp32
layout with the original ``convert_weights``, saves it as a TorchScript archive the way
the released ``RN50.pt`` files are (``torch.jit.trace`` + ``torch.jit.save``), then runs
the original forward in float32 on random images and token ids and stores inputs and
outputs (every bottleneck block's output, the attention pool's output, text features,
logits).  It also writes the key/shape manifests of the published RN50 and RN50x4
configurations, built by the original class on the meta device.
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(embed_dim=16, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=4, vision_patch_size=None,
            context_length=12, vocab_size=40, transformer_width=32, transformer_heads=2, transformer_layers=2)
PUBLISHED = {  # build_model's inference from the released files (clip/model.py), as in neuroprobe's registry
    "rn50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12),
    "rn50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=640,
                   transformer_heads=10, transformer_layers=12),
}


def main(model_py: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("clip_model", model_py)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    out_dir = Path(out)

    for name, cfg in PUBLISHED.items():
        with torch.device("meta"):
            model = m.CLIP(**cfg)
        m.convert_weights(model)
        keys = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}
        (out_dir / f"clip_{name}_keys.json").write_text(json.dumps(keys, indent=0) + "\n")

    torch.manual_seed(0)
    model = m.CLIP(**TINY).eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("logit_scale"):
                continue
            # every parameter random (the original zero-initialises bn3.weight); BatchNorm scales around 1
            is_scale = p.dim() == 1 and k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "1.weight"))
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if is_scale else 0.0))
        for k, b in model.named_buffers():
            if k.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif k.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    m.convert_weights(model)  # the released layout: conv/linear/projection weights in fp16
    images = torch.randn(2, 3, 64, 64)
    text = torch.zeros(2, 12, dtype=torch.long)
    text[0, :5] = torch.tensor([3, 7, 11, 2, 39])  # 39 = end of text (the largest id, found by argmax)
    text[1, :9] = torch.tensor([5, 1, 9, 9, 30, 12, 4, 8, 39])

    traced = torch.jit.trace(model, (images, text), check_trace=False)
    torch.jit.save(traced, str(out_dir / "clip_resnet_tiny_jit.pt"))

    model = model.float()
    acts = {}
    hooks = []
    for name, mod in model.visual.named_modules():
        if name.startswith("layer") and name.count(".") == 1:
            hooks.append(mod.register_forward_hook(lambda _m, _i, o, name=name: acts.__setitem__(f"visual.{name}", o.detach().clone())))
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(text)
        logits_per_image, _ = model(images, text)
    for h in hooks:
        h.remove()
    tensors = {f"act.{k}": v.contiguous() for k, v in acts.items()}
    tensors.update({"in.images": images, "in.text": text, "out.image_features": image_features,
                    "out.text_features": text_features, "out.logits_per_image": logits_per_image})
    save_file(tensors, str(out_dir / "clip_resnet_tiny_parity.safetensors"),
              metadata={"config": json.dumps(TINY), "source": "openai/CLIP clip/model.py, run unchanged"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
