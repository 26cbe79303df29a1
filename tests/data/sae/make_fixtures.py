"""Write the SAE fixtures of tests/test_sae.py with SAELens' and sparsify's own code.

Run in an environment where ``sae-lens`` and ``eai-sparsify`` are installed (they are not
neuroprobe dependencies)::

    python tests/data/sae/make_fixtures.py

Each folder holds an SAE as the library saves it, plus ``expected.safetensors``: an input
``x`` and the library's own ``feature_acts`` and ``reconstruction`` of it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
D_IN, D_SAE = 12, 20


def saelens() -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    import sae_lens

    torch.manual_seed(0)
    x = torch.randn(7, 5, D_IN) * 2 + 0.5
    cases = {
        "saelens_standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "saelens_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
        "saelens_topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, rescale_acts_by_decoder_norm=True)),
    }
    for name, sae in cases.items():
        with torch.no_grad():  # give every tensor non-trivial values (biases start at zero)
            for p in sae.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
            sae.cfg.metadata.hook_name = "encoder.layer.1.mlp"
            sae.cfg.metadata.model_name = "fixture"
            out = HERE / name
            sae.save_model(out)
            f = sae.encode(x)
            save_file({"x": x.contiguous(), "feature_acts": f.contiguous(), "reconstruction": sae.decode(f).contiguous()},
                      str(out / "expected.safetensors"))
            (out / "VERSION").write_text(f"sae-lens {sae_lens.__version__}\n")


def sparsify() -> None:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(1)
    x = torch.randn(9, D_IN) * 2 + 0.5
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        out = HERE / "sparsify_topk"
        sae.save_to_disk(out)
        enc = sae.encode(x)
        dense = torch.zeros(x.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
        save_file({"x": x.contiguous(), "feature_acts": dense.contiguous(),
                   "reconstruction": sae.decode(enc.top_acts, enc.top_indices).contiguous()},
                  str(out / "expected.safetensors"))
        (out / "VERSION").write_text(f"eai-sparsify {version('eai-sparsify')}\n")


if __name__ == "__main__":
    saelens()
    sparsify()
